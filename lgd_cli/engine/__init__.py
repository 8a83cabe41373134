"""The command engines: train, evaluate, benchmark, predict, and what they share (trainer, hooks, checkpoints, launch)."""
from lgd_cli.compat import detectron2 as _compat

_compat.apply()  # before any detectron2 import below this package: see lgd_cli/compat/detectron2.py

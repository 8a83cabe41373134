"""The lgd config: detectron2's defaults, lgd's keys, presets, the allowed values of choice keys (choices.py) and the one builder (build.py)."""
from lgd_cli.compat import detectron2 as _compat

_compat.apply()  # before any detectron2 import below this package: see lgd_cli/compat/detectron2.py

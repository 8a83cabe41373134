"""Datasets: the synthetic shapes set, COCO annotation checks, detectron2 registration.

Importing the package applies lgd's detectron2 shims, as every lgd package that uses detectron2 does.
"""
from lgd_cli.compat import detectron2 as _compat

_compat.apply()  # before any detectron2 import below this package: see lgd_cli/compat/detectron2.py

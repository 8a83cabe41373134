"""lgd's models: the distiller, its students and the backbones it adds to detectron2.

Importing any of them registers the Swin backbones (build_swint_fpn_backbone, build_retinanet_swint_fpn_backbone).
"""
from lgd_cli.compat import detectron2 as _compat

_compat.apply()  # before any detectron2 import below this package: see lgd_cli/compat/detectron2.py

from lgd_cli.modeling import backbones  # noqa: E402,F401  (registers the Swin backbones)

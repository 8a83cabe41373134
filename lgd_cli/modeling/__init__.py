"""lgd's models: the distiller, its students and the backbones it adds to detectron2.

Importing any of them registers the Swin backbones (build_swint_fpn_backbone, build_retinanet_swint_fpn_backbone).
"""
from lgd_cli.modeling import backbones  # noqa: F401

"""Backbones lgd adds to detectron2's BACKBONE_REGISTRY (Swin-T + FPN) and ImageNet weight loading."""
from __future__ import annotations

from lgd_cli.modeling.backbones import swin  # noqa: F401  (registers the build_*swint_fpn_backbone builders)

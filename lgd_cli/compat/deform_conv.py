"""Deformable convolution (DCNv1/DCNv2) for detectron2 without its compiled ops.

detectron2 0.6's DeformConv / ModulatedDeformConv call `detectron2._C`, which the PyPI
snapshot lacks (and whose CPU backward never existed). torchvision's `deform_conv2d`
computes the same operation (same offset layout: (dy, dx) per kernel tap and offset group)
on CPU and GPU, forward and backward, so the two modules' forward is routed through it.
"""
from __future__ import annotations

import torch
from torchvision.ops import deform_conv2d


def _as_pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _forward(module, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None):
    """Shared forward: (N, C_in, H, W), offset (N, 2·G·kh·kw, H', W'), mask (N, G·kh·kw, H', W')."""
    out = deform_conv2d(
        x,
        offset,
        module.weight,
        bias=module.bias,
        stride=_as_pair(module.stride),
        padding=_as_pair(module.padding),
        dilation=_as_pair(module.dilation),
        mask=mask,
    )
    if module.norm is not None:
        out = module.norm(out)
    if module.activation is not None:
        out = module.activation(out)
    return out


def install() -> bool:
    """Route detectron2's deformable convs through torchvision when `_C` lacks them.

    Returns:
        True if the modules were patched, False if compiled ops are present (kept as they are).
    """
    from detectron2 import _C
    from detectron2.layers import deform_conv

    if hasattr(_C, "deform_conv_forward") or getattr(deform_conv.DeformConv, "_lgd_torchvision", False):
        return False
    deform_conv.DeformConv.forward = lambda self, x, offset: _forward(self, x, offset)
    deform_conv.ModulatedDeformConv.forward = lambda self, x, offset, mask: _forward(self, x, offset, mask)
    deform_conv.DeformConv._lgd_torchvision = True
    return True

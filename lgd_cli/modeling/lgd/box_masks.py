"""Per-level masks of the feature cells each object covers (LGD-METHOD.md §3, §5).

Computed once per step and shared by appearance pooling and knowledge rendering.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["box_cell_masks", "instance_cell_masks"]


def box_cell_masks(
    boxes: Tensor,
    include: Tensor,
    is_context: Tensor,
    feature_shapes: list[tuple[int, int]],
    strides: list[int],
) -> list[Tensor]:
    """Mark, per level, the cells whose point lies inside each box.

    As in the reference, cell (i, j) of a level with stride s stands for the image point
    (j·s, i·s) (its index, not index + ½), and it is inside a box when
    |point − box centre| ≤ half the box size on both axes, borders included.

    Args:
        boxes: (B, N, 4) x1y1x2y2 in padded-image pixels.
        include: (B, N) bool; excluded slots (padding) get an all-zero mask.
        is_context: (B, N) bool; context slots cover every cell.
        feature_shapes: L pairs (H_l, W_l).
        strides: L ints, the stride of each level in pixels.

    Returns:
        L float tensors (B, N, H_l, W_l) of 0/1.
    """
    assert len(feature_shapes) == len(strides)
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2  # (B, N, 2) = (cx, cy)
    half = (boxes[..., 2:] - boxes[..., :2]) / 2
    masks = []
    for (H_l, W_l), stride in zip(feature_shapes, strides):
        # Compare in level units. The reference scales by H_l / H, which is 1 / stride
        # whenever the padded size is a multiple of the stride; the stride itself stays
        # right for coarse levels that round up (e.g. p7 when H is only 32-divisible).
        c, h = centre / stride, half / stride
        xs = torch.arange(W_l, device=boxes.device, dtype=boxes.dtype)
        ys = torch.arange(H_l, device=boxes.device, dtype=boxes.dtype)
        inside_x = (xs - c[..., 0:1]).abs() <= h[..., 0:1]  # (B, N, W_l)
        inside_y = (ys - c[..., 1:2]).abs() <= h[..., 1:2]  # (B, N, H_l)
        # Separable test: an outer product instead of a (B, N, H_l, W_l, 2) distance map.
        inside = inside_y[..., :, None] & inside_x[..., None, :]
        inside = (inside | is_context[..., None, None]) & include[..., None, None]
        masks.append(inside.to(boxes.dtype))
    return masks


def instance_cell_masks(
    bitmasks: Tensor,
    include: Tensor,
    is_context: Tensor,
    feature_shapes: list[tuple[int, int]],
) -> list[Tensor]:
    """Per-level cell masks from instance bitmasks, for the label-map (Mask R-CNN) variant.

    The reference pools and renders over the instance's pixels rather than its box
    when label maps are on; each bitmask is resized to the level by nearest sampling.

    Args:
        bitmasks: (B, N, H, W) 0/1 instance masks on the padded canvas (any value for
            context and padding slots: they are overwritten).
        include: (B, N) bool; excluded slots get an all-zero mask.
        is_context: (B, N) bool; context slots cover every cell.
        feature_shapes: L pairs (H_l, W_l).

    Returns:
        L float tensors (B, N, H_l, W_l) of 0/1.
    """
    masks = []
    for shape in feature_shapes:
        resized = F.interpolate(bitmasks.float(), size=shape, mode="nearest") > 0.5
        resized = (resized | is_context[..., None, None]) & include[..., None, None]
        masks.append(resized.float())
    return masks

"""Per-level masks of the feature cells each object covers (docs/method.md §3, §5).

Computed once per step and shared by appearance pooling and knowledge rendering.
"""
from __future__ import annotations

import torch
from torch import Tensor

# CELL_MAPPINGS: how a box in padded-image pixels lands on a level: see level_scales.
from lgd_cli.config.choices import CELL_MAPPINGS

__all__ = ["CELL_MAPPINGS", "box_cell_masks", "level_scales"]


def level_scales(feature_shapes: list[tuple[int, int]], strides: list[int], padded_size: tuple[int, int],
                 mapping: str = "reference") -> list[tuple[float, float]]:
    """Per level, the factors (y, x) that take padded-image pixels to cell units.

    "reference" uses H_l / H and W_l / W (feature size over padded size); "stride" uses 1 / s.
    They agree whenever the padded size is a multiple of the stride; on coarse levels that
    round up (p6, p7 when H is only 32-divisible) the stride keeps a cell's point at index x
    stride, where the detector's own anchors and points are.

    Args:
        feature_shapes: L pairs (H_l, W_l).
        strides: L ints, the stride of each level in pixels.
        padded_size: (H, W) of the padded batch tensor.
        mapping: one of CELL_MAPPINGS.
    """
    if mapping not in CELL_MAPPINGS:
        raise ValueError(f"mapping must be one of {CELL_MAPPINGS}, got {mapping!r}")
    assert len(feature_shapes) == len(strides)
    H, W = padded_size
    if mapping == "stride":
        return [(1.0 / s, 1.0 / s) for s in strides]
    return [(H_l / H, W_l / W) for H_l, W_l in feature_shapes]


def box_cell_masks(
    boxes: Tensor,
    include: Tensor,
    covers_all: Tensor,
    feature_shapes: list[tuple[int, int]],
    scales: list[tuple[float, float]],
) -> list[Tensor]:
    """Mark, per level, the cells whose point lies inside each box.

    As in the reference, the box is scaled to the level and cell (i, j) stands for the point
    (j, i) there (its index, not index + ½); it is inside when |point − box centre| ≤ half
    the box size on both axes, borders included.

    Args:
        boxes: (B, N, 4) x1y1x2y2 in padded-image pixels.
        include: (B, N) bool; excluded slots (padding) get an all-zero mask.
        covers_all: (B, N) bool; these slots (the context box) cover every cell.
        feature_shapes: L pairs (H_l, W_l).
        scales: L pairs (y, x) from ``level_scales``.

    Returns:
        L float tensors (B, N, H_l, W_l) of 0/1.
    """
    assert len(feature_shapes) == len(scales)
    masks = []
    for (H_l, W_l), (sy, sx) in zip(feature_shapes, scales):
        level = boxes * boxes.new_tensor([sx, sy, sx, sy])  # (B, N, 4) in cell units
        c = (level[..., :2] + level[..., 2:]) / 2  # (B, N, 2) = (cx, cy)
        h = (level[..., 2:] - level[..., :2]) / 2
        xs = torch.arange(W_l, device=boxes.device, dtype=boxes.dtype)
        ys = torch.arange(H_l, device=boxes.device, dtype=boxes.dtype)
        inside_x = (xs - c[..., 0:1]).abs() <= h[..., 0:1]  # (B, N, W_l)
        inside_y = (ys - c[..., 1:2]).abs() <= h[..., 1:2]  # (B, N, H_l)
        # Separable test: an outer product instead of a (B, N, H_l, W_l, 2) distance map.
        inside = inside_y[..., :, None] & inside_x[..., None, :]
        inside = (inside | covers_all[..., None, None]) & include[..., None, None]
        masks.append(inside.to(boxes.dtype))
    return masks


"""Appearance embedding: student FPN maps mask-pooled per object and level (docs/method.md §3)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AppearanceEmbedding"]


class AppearanceEmbedding(nn.Module):
    """Projects each student level, then averages it over every object's cell mask.

    The projection is one module shared by all levels, as in the reference.

    Args:
        channels: C, the FPN width.
        detach_features: stop gradients into the student here (DETACH_APPEARANCE_EMBED).
    """

    def __init__(self, channels: int, detach_features: bool = False):
        super().__init__()
        self.detach_features = detach_features
        self.project = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(1, channels, affine=False),
            nn.ReLU(),
        )

    def forward(self, features: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        """Pool projected features under each object's mask.

        Args:
            features: L student maps (B, C, H_l, W_l).
            masks: L cell masks (B, N, H_l, W_l) from ``box_cell_masks``.

        Returns:
            L tensors (B, N, C): mean of the projected cells inside each mask; slots with
            an empty mask (padding, boxes smaller than a cell) are 0.
        """
        assert len(features) == len(masks)
        pooled = []
        for feature, mask in zip(features, masks):
            if self.detach_features:
                feature = feature.detach()
            projected = self.project(feature).flatten(2).transpose(1, 2)  # (B, H_l*W_l, C)
            weights = mask.flatten(2)  # (B, N, H_l*W_l)
            # One batched matmul per level replaces the reference's per-image loop;
            # dividing by max(count, 1) makes the result independent of object size.
            total = torch.bmm(weights, projected)
            count = weights.sum(-1, keepdim=True).clamp(min=1)
            pooled.append(total / count)
        return pooled

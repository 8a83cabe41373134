"""Inter-object relation adapter: attention among the objects of one image (docs/method.md §4).

Images are the batch dimension of the attention, so no object can attend across images.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lgd_cli.config.choices import INTERACT_PATTERNS

__all__ = ["RelationAdapter"]


class RelationAdapter(nn.Module):
    """Mixes label and appearance embeddings per level.

    Patterns (the reference's names): ``stuGuided`` queries with appearance and attends
    over label embeddings (key = value); ``labelGuided`` the reverse; ``student_fill``
    passes the appearance embeddings through; ``teacher_fill`` uses the projected label
    embeddings at every level. The label projection and the attention are shared by all
    levels, as in the reference; modules a pattern never calls are not built, so every
    parameter here receives a gradient (DDP needs no find_unused_parameters for them).

    Args:
        channels: C; must be divisible by num_heads.
        num_heads: attention heads.
        pattern: one of INTERACT_PATTERNS.
    """

    def __init__(self, channels: int, num_heads: int = 8, pattern: str = "stuGuided"):
        super().__init__()
        if pattern not in INTERACT_PATTERNS:
            raise ValueError(f"pattern must be one of {INTERACT_PATTERNS}, got {pattern!r}")
        if channels % num_heads != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.pattern = pattern
        if pattern != "student_fill":
            self.label_proj = nn.Sequential(
                nn.Linear(channels, channels), nn.LayerNorm(channels, elementwise_affine=False), nn.ReLU()
            )
        if pattern in ("stuGuided", "labelGuided"):
            self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)

    def forward(self, label_embed: Tensor, appearance: list[Tensor], include: Tensor) -> list[Tensor]:
        """Relate each object to the other objects of its image, per level.

        Args:
            label_embed: (B, N, C) from ``LabelEncoder``.
            appearance: L tensors (B, N, C) from ``AppearanceEmbedding``.
            include: (B, N) bool, the object slots (real, pseudo and context boxes), not padding.

        Returns:
            L tensors (B, N, C); slots outside ``include`` are exactly zero.
        """
        keep = include[..., None].to(label_embed.dtype)
        if self.pattern == "student_fill":
            return [a * keep for a in appearance]
        label = self.label_proj(label_embed)
        if self.pattern == "teacher_fill":
            return [label * keep for _ in appearance]

        # An image without any object would mask every key and softmax would give NaN;
        # let such rows see all (padding) keys instead: finite, and zeroed below.
        ignore = ~include & include.any(dim=1, keepdim=True)
        # All levels go through one attention call: levels are stacked on the batch
        # axis, which keeps each (level, image) pair a separate attention problem.
        L = len(appearance)
        stacked = torch.cat(appearance, dim=0)  # (L*B, N, C)
        label = label.repeat(L, 1, 1)
        query, memory = (stacked, label) if self.pattern == "stuGuided" else (label, stacked)
        # With N == 0 there is nothing to mask (and torch cannot reshape an empty mask).
        ignore = ignore.repeat(L, 1) if ignore.shape[1] > 0 else None
        # In fp32 also under autocast: a few hundred slots cost little, and a low-precision
        # softmax over them is what would drift.
        dtype = self.attention.in_proj_weight.dtype
        with torch.autocast(query.device.type, enabled=False):
            query, memory = query.to(dtype), memory.to(dtype)
            out, _ = self.attention(query, memory, memory, key_padding_mask=ignore, need_weights=False)
        return [o * keep for o in out.chunk(L, dim=0)]

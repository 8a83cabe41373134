"""Intra-object knowledge mapper: object vectors painted onto FPN grids (docs/method.md §5)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .object_batch import ObjectBatch

__all__ = ["KnowledgeMapper"]


def _conv_norm(channels: int) -> list[nn.Module]:
    return [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels, affine=False)]


class KnowledgeMapper(nn.Module):
    """Renders the per-object vectors into teacher feature maps of the student's shapes.

    All layers are shared across levels, as in the reference.

    Args:
        channels: C, the FPN width.
        add_context_box: the objects carry a context slot whose vector is added to every
            cell (ADD_CONTEXT_BOX); its projection exists only then.
    """

    def __init__(self, channels: int, add_context_box: bool = False):
        super().__init__()
        self.add_context_box = add_context_box
        self.instance_proj = nn.Linear(channels, channels)
        self.instance_conv = nn.Conv2d(channels, channels, 3, padding=1)
        if add_context_box:
            self.context_proj = nn.Linear(channels, channels)
        self.refine = nn.Sequential(
            *_conv_norm(channels), nn.ReLU(), *_conv_norm(channels), nn.ReLU(), *_conv_norm(channels)
        )

    def forward(self, object_vectors: list[Tensor], masks: list[Tensor], objects: ObjectBatch) -> list[Tensor]:
        """Paint, add context, refine.

        Args:
            object_vectors: L tensors (B, N, C) from ``RelationAdapter``.
            masks: L cell masks (B, N, H_l, W_l) from ``box_cell_masks``.
            objects: the padded batch; ``painted`` picks the painted slots (real boxes,
                a pseudo box without the context box) and ``is_context`` the context slot.

        Returns:
            L teacher maps (B, C, H_l, W_l), the shapes of the masks' grids.
        """
        assert len(object_vectors) == len(masks)
        paint = objects.painted[..., None].to(masks[0].dtype)  # (B, N, 1)
        context = objects.is_context[..., None].to(masks[0].dtype)
        outputs = []
        for vectors, mask in zip(object_vectors, masks):
            B, N, H_l, W_l = mask.shape
            # 1. Σ over painted objects of vector · mask, as one (C, N) × (N, H_l*W_l) product
            #    per image; context and padding slots carry weight 0.
            weights = mask.flatten(2) * paint  # (B, N, H_l*W_l)
            painted = torch.bmm(self.instance_proj(vectors).transpose(1, 2), weights)
            x = self.instance_conv(painted.view(B, -1, H_l, W_l))
            # 2. The context vector (one slot per image) lifts every cell alike.
            if self.add_context_box:
                x = x + (self.context_proj(vectors) * context).sum(dim=1)[:, :, None, None]
            outputs.append(self.refine(torch.relu(x)))
        return outputs

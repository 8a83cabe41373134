"""Label encoder: box + class (+ mask crop) descriptors -> label embeddings (docs/method.md §2).

A PointNet over each image's set of objects, run on the padded (B, N) slots at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgd_cli.config.choices import CATEGORY_FORMATS

from .object_batch import ObjectBatch

__all__ = ["LabelEncoder"]


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear -> LayerNorm (no affine) -> ReLU per step; Linear equals the reference's Conv1d k=1."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(d_in, d_out), nn.LayerNorm(d_out, elementwise_affine=False), nn.ReLU()]
    return nn.Sequential(*layers)


class _TNet(nn.Module):
    """Predicts one k×k transform per object (PointNet T-net, no identity shortcut).

    The reference max-pools over a length-1 sequence, i.e. over nothing, so each object
    gets its own matrix from its own descriptor and no pooling step appears here.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.body = _mlp([k, 64, 128, 1024, 512, 256])
        self.out = nn.Linear(256, k * k)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, k) -> (B, N, k, k)
        return self.out(self.body(x)).unflatten(-1, (self.k, self.k))


class LabelEncoder(nn.Module):
    """Encodes each object's label descriptor into a C-dim label embedding.

    Args:
        num_classes: K, the number of foreground classes.
        out_channels: C, the embedding width (the FPN channels).
        category_format: "one_hot" (K values) or "norm_classes" (class / K, one value).
        use_mask_crops: append the 7×7 instance-mask crop (Mask R-CNN label maps).
    """

    def __init__(self, num_classes: int, out_channels: int, category_format: str = "one_hot",
                 use_mask_crops: bool = False):
        super().__init__()
        if category_format not in CATEGORY_FORMATS:
            raise ValueError(f"category_format must be one of {CATEGORY_FORMATS}, got {category_format!r}")
        self.num_classes = num_classes
        self.category_format = category_format
        self.use_mask_crops = use_mask_crops
        self.in_dim = 4 + (num_classes if category_format == "one_hot" else 1) + (49 if use_mask_crops else 0)
        self.input_transform = _TNet(self.in_dim)
        self.embed_local = _mlp([self.in_dim, 64])
        self.feature_transform = _TNet(64)
        self.embed_global = _mlp([64, 128, 1024])
        self.fuse = _mlp([64 + 1024, out_channels])

    @torch.no_grad()
    def descriptors(self, objects: ObjectBatch, padded_size: tuple[int, int]) -> Tensor:
        """Build the [-1, 1] descriptor of every slot.

        Args:
            objects: the padded batch of objects.
            padded_size: (H, W) of the padded batch tensor; boxes are divided by it.

        Returns:
            (B, N, D) with D = 4 + (K or 1) + (49 if use_mask_crops); padding rows are -1.
        """
        H, W = padded_size
        scale = torch.tensor([W, H, W, H], dtype=objects.boxes.dtype).to(objects.boxes.device, non_blocking=True)
        boxes = (objects.boxes / scale).clamp(0, 1)
        real = objects.valid[..., None].to(boxes.dtype)
        if self.category_format == "one_hot":
            # Context and padding (class -1) get the all-zero class vector.
            category = F.one_hot(objects.classes.clamp(min=0), self.num_classes).to(boxes.dtype) * real
        else:
            category = objects.classes.clamp(min=0)[..., None].to(boxes.dtype) / self.num_classes * real
        parts = [boxes, category]
        if self.use_mask_crops:
            if objects.masks is None:
                raise ValueError("use_mask_crops=True needs ObjectBatch.masks (pass gt_masks7 to pack_objects)")
            parts.append(objects.masks.flatten(2).to(boxes.dtype))
        desc = torch.cat(parts, dim=-1) * objects.include[..., None].to(boxes.dtype)
        return desc * 2 - 1

    def forward(self, objects: ObjectBatch, padded_size: tuple[int, int]) -> Tensor:
        """Embed every object; images never share information except through their own pool.

        Args:
            objects: the padded batch of objects (B images, N slots).
            padded_size: (H, W) of the padded batch tensor.

        Returns:
            (B, N, C) label embeddings; padding slots are exactly zero.
        """
        include = objects.include[..., None]  # (B, N, 1)
        x = self.descriptors(objects, padded_size)
        # 1. Per-object transforms: a row vector times its own predicted matrix.
        x = torch.einsum("bnk,bnkj->bnj", x, self.input_transform(x))
        x = self.embed_local(x)
        local = torch.einsum("bnk,bnkj->bnj", x, self.feature_transform(x))  # (B, N, 64)
        x = self.embed_global(local)  # (B, N, 1024), >= 0 after ReLU
        # 2. Per-image max-pool over its objects. Features are >= 0, so filling padding
        #    with 0 and appending one zero slot changes no maximum, gives 0 for an image
        #    with no objects, and keeps N == 0 on the same (gradient-carrying) path.
        pooled = F.pad(x.masked_fill(~include, 0.0), (0, 0, 0, 1)).amax(dim=1)  # (B, 1024)
        # 3. Fuse each object's local feature with its image's global one.
        fused = torch.cat([local, pooled[:, None, :].expand(-1, x.shape[1], -1)], dim=-1)
        return self.fuse(fused) * include

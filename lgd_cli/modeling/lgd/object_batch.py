"""Ground-truth objects of a batch as one padded (B, N) tensor set (LGD-METHOD.md §2, §9).

Every teacher module works on these slots, so nothing loops over images and attention
cannot cross images: slot n of image b only ever meets slots of the same row b.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = ["ObjectBatch", "pack_objects"]


@dataclass
class ObjectBatch:
    """Padded per-image objects; the context slot, when present, is the last column.

    Attributes:
        boxes: (B, N, 4) float x1y1x2y2 in padded-image pixels, clamped to each image.
        classes: (B, N) long, 0-based class of a real box; -1 for padding and context.
        valid: (B, N) bool, True for real ground-truth boxes.
        is_context: (B, N) bool, True for the whole-scene context slot.
        masks: (B, N, 7, 7) float instance-mask crops in [0, 1] (ones for the context
            slot, zeros for padding), or None when label maps are off.
    """

    boxes: Tensor
    classes: Tensor
    valid: Tensor
    is_context: Tensor
    masks: Tensor | None = None

    @property
    def include(self) -> Tensor:
        """(B, N) bool: slots that are objects (real boxes or context), i.e. not padding."""
        return self.valid | self.is_context

    @property
    def num_slots(self) -> int:
        return self.boxes.shape[1]


def pack_objects(
    gt_boxes: list[Tensor],
    gt_classes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    padded_size: tuple[int, int],
    add_context_box: bool,
    gt_masks7: list[Tensor] | None = None,
) -> ObjectBatch:
    """Pad the per-image ground truth into one :class:`ObjectBatch`.

    Args:
        gt_boxes: B tensors (N_i, 4), x1y1x2y2 in pixels of the padded batch tensor.
        gt_classes: B tensors (N_i,), 0-based class indices.
        image_sizes: B pairs (h_i, w_i), each image's size before padding.
        padded_size: (H, W) of the padded batch tensor (``images.tensor``).
        add_context_box: append one context slot per image with box [0, 0, W, H].
        gt_masks7: optional B tensors (N_i, 7, 7), instance masks cropped to their box.

    Returns:
        ObjectBatch with N = max_i N_i (+1 with the context box); N may be 0.
    """
    assert len(gt_boxes) == len(gt_classes) == len(image_sizes) > 0
    device = gt_boxes[0].device
    B = len(gt_boxes)
    H, W = padded_size

    # 1. Pad the real objects; slots past N_i are padding.
    boxes = pad_sequence([b.reshape(-1, 4).float() for b in gt_boxes], batch_first=True)
    classes = pad_sequence([c.reshape(-1).long() for c in gt_classes], batch_first=True, padding_value=-1)
    # Host values reach the device without a blocking copy (on CUDA, each blocking copy waits for
    # the whole stream): the padding is where pad_sequence put class -1, and the sizes are queued.
    valid = classes >= 0

    # 2. Clamp to each image's own extent, so a box never reaches into the padding.
    sizes = torch.tensor(image_sizes, dtype=boxes.dtype).to(device, non_blocking=True)  # (B, 2) = (h, w)
    limits = sizes.flip(1).repeat(1, 2)[:, None, :]  # (B, 1, 4) = (w, h, w, h)
    boxes = torch.minimum(boxes.clamp(min=0), limits)

    masks = None
    if gt_masks7 is not None:
        masks = pad_sequence([m.reshape(-1, 7, 7).float() for m in gt_masks7], batch_first=True)

    # 3. The context slot goes in one extra last column for every image.
    is_context = torch.zeros_like(valid)
    if add_context_box:
        context_box = torch.tensor([0.0, 0.0, W, H], dtype=boxes.dtype).to(device, non_blocking=True).expand(B, 1, 4)
        boxes = torch.cat([boxes, context_box], dim=1)
        classes = torch.cat([classes, classes.new_full((B, 1), -1)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(B, 1)], dim=1)
        is_context = torch.cat([is_context, is_context.new_ones(B, 1)], dim=1)
        if masks is not None:
            # The reference describes the whole scene with a full mask crop.
            masks = torch.cat([masks, masks.new_ones(B, 1, 7, 7)], dim=1)
    return ObjectBatch(boxes=boxes, classes=classes, valid=valid, is_context=is_context, masks=masks)

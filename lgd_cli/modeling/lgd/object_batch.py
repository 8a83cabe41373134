"""Ground-truth objects of a batch as one padded (B, N) tensor set (docs/method.md §2, §9).

Every teacher module works on these slots, so nothing loops over images and attention
cannot cross images: slot n of image b only ever meets slots of the same row b.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from lgd_cli.config.choices import BOX_CLAMPS, EMPTY_IMAGE_RULES

__all__ = ["BOX_CLAMPS", "EMPTY_IMAGE_RULES", "ObjectBatch", "pack_objects"]

# BOX_CLAMPS: "reference": every box, the context box included, clamped to [0, W-1] x [0, H-1] of
# the padded canvas; "image": real boxes clamped to their own image, context box [0, 0, W, H].
# EMPTY_IMAGE_RULES: "reference": an image without boxes gets one pseudo box [0, 0, 1, 1] and no
# context box; "context": it gets only its context slot (none at all without the context box).
PSEUDO_BOX = (0.0, 0.0, 1.0, 1.0)


@dataclass
class ObjectBatch:
    """Padded per-image objects; the context slot, when present, is the last column.

    Attributes:
        boxes: (B, N, 4) float x1y1x2y2 in padded-image pixels, clamped (see BOX_CLAMPS).
        classes: (B, N) long, 0-based class of a real box; -1 for every other slot.
        valid: (B, N) bool, True for real ground-truth boxes.
        is_context: (B, N) bool, True for the slot rendered as the whole-scene context vector.
        masks: (B, N, 7, 7) float instance-mask crops in [0, 1] (ones for the context
            slot, zeros for padding and pseudo boxes), or None when label maps are off.
        is_pseudo: (B, N) bool, True for the stand-in box of an image without ground truth
            (EMPTY_IMAGE "reference"). With the context box on it sits in the context column
            and is rendered as the context (the reference treats an image's last slot so),
            but its cell mask comes from its box; otherwise it is painted like a real box.
            None means no pseudo boxes.
    """

    boxes: Tensor
    classes: Tensor
    valid: Tensor
    is_context: Tensor
    masks: Tensor | None = None
    is_pseudo: Tensor | None = None

    def __post_init__(self):
        if self.is_pseudo is None:
            self.is_pseudo = torch.zeros_like(self.valid)

    @property
    def include(self) -> Tensor:
        """(B, N) bool: slots that are objects (real, pseudo or context), i.e. not padding."""
        return self.valid | self.is_context | self.is_pseudo

    @property
    def painted(self) -> Tensor:
        """(B, N) bool: slots the knowledge mapper paints onto the grid (all objects but the context)."""
        return self.include & ~self.is_context

    @property
    def covers_all(self) -> Tensor:
        """(B, N) bool: slots whose cell mask is every cell (the context box proper, not a pseudo box)."""
        return self.is_context & ~self.is_pseudo

    @property
    def num_slots(self) -> int:
        return self.boxes.shape[1]


def _on(device, values, dtype) -> Tensor:
    """A small host constant on `device`, copied without waiting for the stream."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def pack_objects(
    gt_boxes: list[Tensor],
    gt_classes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    padded_size: tuple[int, int],
    add_context_box: bool,
    gt_masks7: list[Tensor] | None = None,
    *,
    box_clamp: str = "reference",
    empty_image: str = "reference",
) -> ObjectBatch:
    """Pad the per-image ground truth into one :class:`ObjectBatch`.

    Args:
        gt_boxes: B tensors (N_i, 4), x1y1x2y2 in pixels of the padded batch tensor.
        gt_classes: B tensors (N_i,), 0-based class indices.
        image_sizes: B pairs (h_i, w_i), each image's size before padding.
        padded_size: (H, W) of the padded batch tensor (``images.tensor``).
        add_context_box: append one context slot per image with box [0, 0, W, H].
        gt_masks7: optional B tensors (N_i, 7, 7), instance masks cropped to their box.
        box_clamp: one of BOX_CLAMPS.
        empty_image: one of EMPTY_IMAGE_RULES.

    Returns:
        ObjectBatch with N = max_i N_i (+1 with the context box; at least 1 when an empty
        image gets a pseudo box); N may be 0.
    """
    assert len(gt_boxes) == len(gt_classes) == len(image_sizes) > 0
    if box_clamp not in BOX_CLAMPS:
        raise ValueError(f"box_clamp must be one of {BOX_CLAMPS}, got {box_clamp!r}")
    if empty_image not in EMPTY_IMAGE_RULES:
        raise ValueError(f"empty_image must be one of {EMPTY_IMAGE_RULES}, got {empty_image!r}")
    device = gt_boxes[0].device
    B = len(gt_boxes)
    H, W = padded_size

    # 1. Pad the real objects; slots past N_i are padding.
    boxes = pad_sequence([b.reshape(-1, 4).float() for b in gt_boxes], batch_first=True)
    classes = pad_sequence([c.reshape(-1).long() for c in gt_classes], batch_first=True, padding_value=-1)
    # Host values reach the device without a blocking copy (on CUDA, each blocking copy waits for
    # the whole stream): the padding is where pad_sequence put class -1, and constants are queued.
    valid = classes >= 0
    counts = valid.sum(1)
    masks = None
    if gt_masks7 is not None:
        masks = pad_sequence([m.reshape(-1, 7, 7).float() for m in gt_masks7], batch_first=True)
    is_context = torch.zeros_like(valid)
    is_pseudo = torch.zeros_like(valid)
    pseudo_rows = (counts == 0) if empty_image == "reference" else torch.zeros_like(counts, dtype=torch.bool)
    pseudo_box = _on(device, PSEUDO_BOX, boxes.dtype)

    # 2. lgd's clamp: to each image's own extent, so a box never reaches into the padding.
    if box_clamp == "image":
        sizes = _on(device, image_sizes, boxes.dtype)  # (B, 2) = (h, w)
        limits = sizes.flip(1).repeat(1, 2)[:, None, :]  # (B, 1, 4) = (w, h, w, h)
        boxes = torch.minimum(boxes.clamp(min=0), limits)

    # 3. The context slot goes in one extra last column for every image; the pseudo box of an
    #    empty image takes that column (the reference renders an image's last slot as context),
    #    or column 0 without the context box.
    if add_context_box:
        context_box = _on(device, [0.0, 0.0, W, H], boxes.dtype).expand(B, 1, 4)
        boxes = torch.cat([boxes, context_box], dim=1)
        classes = torch.cat([classes, classes.new_full((B, 1), -1)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(B, 1)], dim=1)
        is_context = torch.cat([is_context, is_context.new_ones(B, 1)], dim=1)
        is_pseudo = torch.cat([is_pseudo, pseudo_rows[:, None]], dim=1)
        if masks is not None:
            # The reference describes the whole scene with a full mask crop.
            masks = torch.cat([masks, masks.new_ones(B, 1, 7, 7)], dim=1)
    elif pseudo_rows.any():
        if boxes.shape[1] == 0:
            boxes, classes = boxes.new_zeros(B, 1, 4), classes.new_full((B, 1), -1)
            valid, is_context, is_pseudo = (valid.new_zeros(B, 1) for _ in range(3))
            masks = masks.new_zeros(B, 1, 7, 7) if masks is not None else None
        is_pseudo[:, 0] = pseudo_rows
    boxes = torch.where(is_pseudo[..., None], pseudo_box, boxes)
    if masks is not None:
        masks = masks.masked_fill(is_pseudo[..., None, None], 0.0)  # the reference's crop of a pseudo box

    # 4. The reference's clamp: everything, context included, to the last pixel of the canvas.
    if box_clamp == "reference":
        limits = _on(device, [W - 1, H - 1, W - 1, H - 1], boxes.dtype)
        boxes = torch.minimum(boxes.clamp(min=0), limits)
    return ObjectBatch(boxes=boxes, classes=classes, valid=valid, is_context=is_context, masks=masks,
                       is_pseudo=is_pseudo)

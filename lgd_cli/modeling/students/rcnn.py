"""Seams into detectron2's GeneralizedRCNN (Faster / Mask R-CNN with an FPN and an RPN).

The distiller needs what GeneralizedRCNN.forward does in one go, split apart: the preprocessed
images, the FPN maps every head reads (p2-p6 for the RPN, p2-p5 for the ROI heads), and
"RPN + ROI heads + their losses on these maps" callable twice (student maps, then teacher maps)
with the same ground truth. The RPN's sampled anchor labels are shared by both passes; each
pass's ROI heads train on the proposals of its own maps, as the reference does.

Also here: the Mask R-CNN label maps (LOAD_LABELMAP), i.e. the instance masks turned into the
7×7 crops of the label descriptor and into per-level cell masks for pooling and rendering.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import BitMasks, ImageList, Instances, PolygonMasks
from detectron2.structures.masks import polygons_to_bitmask

from lgd_cli.errors import ConfigError
from lgd_cli.modeling.lgd.box_masks import CELL_MAPPINGS
from lgd_cli.modeling.students.base import StudentSeams

__all__ = ["RCNNSeams", "RCNNTargets", "label_map_cells", "label_map_crops"]


@dataclass
class RCNNTargets:
    """The RPN's anchors and sampled anchor labels of one batch, shared by the student and teacher passes."""

    anchors: Any = None
    gt_labels: Any = None
    gt_boxes: Any = None


class RCNNSeams(StudentSeams):
    """Stateless view over a detectron2 GeneralizedRCNN with an RPN (no parameters of its own)."""

    def __init__(self, detector: GeneralizedRCNN):
        if not isinstance(detector.proposal_generator, RPN):
            raise ConfigError("LGD needs an R-CNN with a region proposal network (MODEL.PROPOSAL_GENERATOR.NAME=RPN), "
                              f"not {type(detector.proposal_generator).__name__}")
        if not hasattr(detector.roi_heads, "box_in_features"):
            raise ConfigError("LGD needs an R-CNN on FPN levels (StandardROIHeads or a subclass), "
                              f"not {type(detector.roi_heads).__name__}")
        super().__init__(detector)

    def head_modules(self) -> list:
        return [self.detector.proposal_generator, self.detector.roi_heads]

    @staticmethod
    def new_targets() -> RCNNTargets:
        """An empty container for one batch's RPN targets, filled by the first `losses` call."""
        return RCNNTargets()

    @property
    def in_features(self) -> list[str]:
        """Every FPN level a head reads, finest first: the RPN's, plus any only the ROI heads read."""
        det = self.detector
        names = list(det.proposal_generator.in_features)
        for attr in ("box_in_features", "mask_in_features", "keypoint_in_features"):
            names += [f for f in getattr(det.roi_heads, attr, None) or [] if f not in names]
        shapes = det.backbone.output_shape()
        return sorted(names, key=lambda f: shapes[f].stride)

    @property
    def num_classes(self) -> int:
        return self.detector.roi_heads.num_classes

    def _rpn(self, images: ImageList, features: dict[str, Tensor], gt_instances, targets: RCNNTargets | None):
        # detectron2's RPN.forward, with the anchor sampling done once per batch (`targets`).
        rpn = self.detector.proposal_generator
        maps = [features[f] for f in rpn.in_features]
        logits, deltas = rpn.rpn_head(maps)
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]  # (B, H*W*A)
        dim = rpn.anchor_generator.box_dim
        deltas = [x.view(x.shape[0], -1, dim, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
                  for x in deltas]  # (B, H*W*A, dim)
        if targets is None:
            anchors, losses = rpn.anchor_generator(maps), {}
        else:
            if targets.anchors is None:
                targets.anchors = rpn.anchor_generator(maps)
                targets.gt_labels, targets.gt_boxes = rpn.label_and_sample_anchors(targets.anchors, gt_instances)
            anchors = targets.anchors
            losses = rpn.losses(anchors, logits, targets.gt_labels, deltas, targets.gt_boxes)
        return rpn.predict_proposals(anchors, logits, deltas, images.image_sizes), losses

    def losses(self, images: ImageList, features: list[Tensor], gt_instances: list[Instances],
               targets: RCNNTargets) -> dict[str, Tensor]:
        """RPN + ROI-head losses on `features`; the first call fills `targets`, later calls reuse them."""
        named = dict(zip(self.in_features, features))
        proposals, rpn_losses = self._rpn(images, named, gt_instances, targets)
        _, losses = self.detector.roi_heads(images, named, proposals, gt_instances)
        losses.update(rpn_losses)
        return losses

    def inference(self, images: ImageList, features: list[Tensor], batched_inputs: list[dict]) -> list[dict]:
        """Detections (with masks for Mask R-CNN) from given maps, post-processed to each input's size."""
        named = dict(zip(self.in_features, features))
        proposals, _ = self._rpn(images, named, None, None)
        results, _ = self.detector.roi_heads(images, named, proposals, None)
        return GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes)


def _masks_of(instances: Instances):
    if instances.has("gt_masks"):
        return instances.gt_masks
    if len(instances) == 0:
        return None
    raise ValueError("MODEL.DISTILLATOR.LABEL_ENCODER.LOAD_LABELMAP needs instance masks, but the ground truth has "
                     "none (the data mapper loads them only with MODEL.MASK_ON=True)")


def label_map_crops(gt_instances: list[Instances], size: int = 7) -> list[Tensor]:
    """Each instance mask cropped to its box and resized to size×size: B tensors (N_i, size, size) in [0, 1]."""
    crops = []
    for inst in gt_instances:
        masks, boxes = _masks_of(inst), inst.gt_boxes.tensor
        if masks is None:
            crops.append(boxes.new_zeros(0, size, size))
        else:
            crops.append(masks.crop_and_resize(boxes, size).to(boxes.dtype))
    return crops


def _sample_masks(masks, count: int, stride: int, grid: tuple[int, int]) -> Tensor:
    """(count, *grid) bool: is the image point (j·stride, i·stride) inside each instance mask."""
    out = torch.zeros(count, *grid, dtype=torch.bool)
    if count == 0:
        return out
    if isinstance(masks, PolygonMasks):
        # Rasterise on the stride grid directly: shifted by half a cell, pixel (i, j) of the
        # scaled polygon covers the image points within half a stride of (j·s, i·s).
        shift = stride / 2.0
        for k, polygons in enumerate(masks.polygons):
            scaled = [(np.asarray(p, dtype=np.float64) + shift) / stride for p in polygons]
            out[k] = torch.from_numpy(polygons_to_bitmask(scaled, *grid))
        return out
    if isinstance(masks, BitMasks):
        sampled = masks.tensor[:, ::stride, ::stride].cpu()
        h, w = min(grid[0], sampled.shape[1]), min(grid[1], sampled.shape[2])
        out[:, :h, :w] = sampled[:, :h, :w]
        return out
    raise ValueError(f"unsupported instance mask type {type(masks).__name__} (PolygonMasks or BitMasks expected)")


def _nearest_indices(size_in: int, size_out: int) -> Tensor:
    """(size_out,) long: the input index F.interpolate(mode="nearest") reads for each output index."""
    positions = torch.arange(size_in, dtype=torch.float32).view(1, 1, -1)
    return F.interpolate(positions, size=size_out, mode="nearest").view(-1).long()


def _full_resolution_cells(gt_instances: list[Instances], num_slots: int, feature_shapes: list[tuple[int, int]],
                           padded_size: tuple[int, int]) -> list[Tensor]:
    """The reference's rule: each instance mask at full resolution, padded to the canvas and
    resized to every level by nearest sampling; L bool tensors (B, num_slots, H_l, W_l) on the CPU.

    One instance is rasterised at a time and sampled at once, so no (N, H, W) stack is ever held.
    """
    H, W = padded_size
    points = [(_nearest_indices(H, h), _nearest_indices(W, w)) for h, w in feature_shapes]
    cells = [torch.zeros(len(gt_instances), num_slots, h, w, dtype=torch.bool) for h, w in feature_shapes]
    for b, inst in enumerate(gt_instances):
        masks = _masks_of(inst)
        if masks is None:
            continue
        h_i, w_i = inst.image_size
        for k in range(len(inst)):
            if isinstance(masks, PolygonMasks):
                full = torch.from_numpy(polygons_to_bitmask(masks.polygons[k], h_i, w_i))
            elif isinstance(masks, BitMasks):
                full = masks.tensor[k].cpu().bool()
            else:
                raise ValueError(f"unsupported instance mask type {type(masks).__name__} "
                                 "(PolygonMasks or BitMasks expected)")
            for level, (rows, cols) in zip(cells, points):
                # Points on the padding (index >= the image's size) stay outside every mask.
                r, c = rows[rows < full.shape[0]], cols[cols < full.shape[1]]
                level[b, k, :len(r), :len(c)] = full[r][:, c]
    return cells


def label_map_cells(gt_instances: list[Instances], include: Tensor, is_context: Tensor,
                    feature_shapes: list[tuple[int, int]], strides: list[int], padded_size: tuple[int, int],
                    mapping: str = "reference") -> list[Tensor]:
    """Per-level cell masks shaped like the instance masks (the label-map variant of ``box_cell_masks``).

    With mapping "reference", level l samples the instance mask (padded to the canvas) at the
    pixels nearest interpolation to (H_l, W_l) reads, i.e. row floor(i·H/H_l), as the reference
    does. With "stride", cell (i, j) stands for the image point (j·s, i·s), as for boxes: the
    instances are rasterised once on the finest level's grid and the coarser levels sample it,
    so no full-resolution bitmask is ever built. The two agree where H and W are multiples of s.

    Args:
        gt_instances: B Instances with gt_masks (PolygonMasks or BitMasks), in the slot order
            of the ObjectBatch (real boxes first).
        include: (B, N) bool, the ObjectBatch's object slots; others get an empty mask.
        is_context: (B, N) bool; context slots cover every cell.
        feature_shapes: L pairs (H_l, W_l); strides: L strides in pixels.
        padded_size: (H, W) of the padded batch tensor.
        mapping: "reference" or "stride" (MODEL.DISTILLATOR.TEACHER.CELL_MAPPING).

    Returns:
        L float tensors (B, N, H_l, W_l) of 0/1, on `include`'s device.
    """
    if mapping not in CELL_MAPPINGS:
        raise ValueError(f"mapping must be one of {CELL_MAPPINGS}, got {mapping!r}")
    B, N = include.shape
    if mapping == "reference":
        levels = _full_resolution_cells(gt_instances, N, feature_shapes, padded_size)
    else:
        levels = _stride_grid_cells(gt_instances, N, feature_shapes, strides)
    cells = []
    for level in levels:
        level = (level.to(include.device) | is_context[..., None, None]) & include[..., None, None]
        cells.append(level.float())
    return cells


def _stride_grid_cells(gt_instances: list[Instances], num_slots: int, feature_shapes: list[tuple[int, int]],
                       strides: list[int]) -> list[Tensor]:
    """lgd's rule: masks sampled at the points (j·s, i·s); L bool tensors (B, num_slots, H_l, W_l) on the CPU."""
    base = min(strides)
    if any(s % base for s in strides):
        raise ValueError(f"level strides {strides} must be multiples of the finest one")
    # The finest grid, large enough for every level's sample points.
    grid = (max((h - 1) * (s // base) + 1 for (h, _), s in zip(feature_shapes, strides)),
            max((w - 1) * (s // base) + 1 for (_, w), s in zip(feature_shapes, strides)))
    fine = torch.zeros(len(gt_instances), num_slots, *grid, dtype=torch.bool)
    for b, inst in enumerate(gt_instances):
        masks = _masks_of(inst)
        if masks is not None:
            fine[b, :len(inst)] = _sample_masks(masks, len(inst), base, grid)
    return [fine[:, :, ::s // base, ::s // base][:, :, :h, :w] for (h, w), s in zip(feature_shapes, strides)]

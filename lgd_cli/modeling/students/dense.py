"""Seams into detectron2's one-stage detectors (RetinaNet, FCOS).

The distiller needs what DenseDetector.forward computes in one go, split apart: the
preprocessed images, the FPN features, the targets, and "head + loss on these features"
callable twice (student maps, then teacher maps) with the same targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage

# LOSS_NORMALIZER_RULES: how the detector's loss-normaliser EMA (num positives, momentum 0.9) meets
# the two passes. "reference": every `losses` call updates it, so it advances twice per step and the
# teacher pass sees the second update; "per_step": later passes of a batch rewind it to the first's.
from lgd_cli.config.choices import LOSS_NORMALIZER_RULES
from lgd_cli.modeling.students.base import StudentSeams


@dataclass
class DenseTargets:
    """Anchor matching of one batch, computed once and shared by the student and teacher passes."""

    anchors: Any = None
    gt_labels: Any = None
    gt_boxes: Any = None
    normalizer: float | None = None  # the loss-normaliser EMA before this batch


class DenseSeams(StudentSeams):
    """Stateless view over a detectron2 DenseDetector (no parameters of its own).

    Args:
        detector: a detectron2 RetinaNet or FCOS (targets shared between passes), or
            another DenseDetector (head + its own forward_training per pass).
        loss_normalizer: one of LOSS_NORMALIZER_RULES.
    """

    def __init__(self, detector: DenseDetector, loss_normalizer: str = "reference"):
        if loss_normalizer not in LOSS_NORMALIZER_RULES:
            raise ValueError(f"loss_normalizer must be one of {LOSS_NORMALIZER_RULES}, got {loss_normalizer!r}")
        super().__init__(detector)
        self.loss_normalizer = loss_normalizer

    @property
    def in_features(self) -> list[str]:
        return list(self.detector.head_in_features)

    def head_modules(self) -> list:
        return [self.detector.head]

    @staticmethod
    def new_targets() -> DenseTargets:
        """An empty container for one batch's targets, filled by the first `losses` call."""
        return DenseTargets()

    @property
    def num_classes(self) -> int:
        return self.detector.num_classes

    def losses(self, images: ImageList, features: list[Tensor], gt_instances: list[Instances],
               targets: DenseTargets, predictions=None) -> dict[str, Tensor]:
        """Head + loss on `features` (or on the head's `predictions` for them). The first call fills
        `targets`; later calls reuse them.

        detectron2's `losses` updates the detector's `loss_normalizer` EMA on every call; with
        the "per_step" rule a later call first restores the value the first call started from.
        Either way the attribute holds the end-of-step state that checkpoints record.
        """
        det = self.detector
        predictions = det.head(features) if predictions is None else predictions
        if isinstance(det, RetinaNet):
            dims = [det.num_classes, 4]  # logits, box deltas
        elif isinstance(det, FCOS):
            dims = [det.num_classes, 4, 1]  # logits, box deltas, centerness
        else:
            return det.forward_training(images, features, predictions, gt_instances)
        pred_logits, pred_deltas, *extra = det._transpose_dense_predictions(predictions, dims)
        if targets.anchors is None:
            targets.anchors = det.anchor_generator(features)
            targets.gt_labels, targets.gt_boxes = det.label_anchors(targets.anchors, gt_instances)
            targets.normalizer = getattr(det, "loss_normalizer", None)
        elif self.loss_normalizer == "per_step":
            # Same batch, same positives: rewind the EMA so the second pass normalises exactly
            # like the first and leaves the same state behind.
            if targets.normalizer is not None:
                det.loss_normalizer = targets.normalizer
            else:
                del det.loss_normalizer
        return det.losses(targets.anchors, pred_logits, targets.gt_labels, pred_deltas, targets.gt_boxes, *extra)

    def student_and_teacher_losses(self, images: ImageList, features: list[Tensor], teacher_maps: list[Tensor],
                                   gt_instances: list[Instances], targets: DenseTargets, *,
                                   teacher_trains_head: bool = True):
        """Both passes of `losses` with one head call on the student's and teacher's maps stacked.

        Exact where the head treats every image alone (GroupNorm or no norm, as in every preset);
        a BatchNorm head (statistics over the batch), or a teacher pass that must not train the
        head, keeps two calls.
        """
        head = self.detector.head
        if not teacher_trains_head or any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules()):
            return super().student_and_teacher_losses(images, features, teacher_maps, gt_instances, targets,
                                                      teacher_trains_head=teacher_trains_head)
        B = features[0].shape[0]
        # Per level (B, C, H, W) + (B, C, H, W) -> (2B, C, H, W); each output list splits back.
        stacked = head([torch.cat([s, t]) for s, t in zip(features, teacher_maps)])
        student = self.losses(images, features, gt_instances, targets, [[p[:B] for p in out] for out in stacked])
        with get_event_storage().name_scope("teacher"):
            teacher = self.losses(images, teacher_maps, gt_instances, targets, [[p[B:] for p in out] for out in stacked])
        return student, teacher

    def inference(self, images: ImageList, features: list[Tensor], batched_inputs: list[dict]) -> list[dict]:
        """Detections from given maps, post-processed to each input's requested size."""
        from detectron2.modeling.postprocessing import detector_postprocess

        det = self.detector
        results = det.forward_inference(images, features, det.head(features))
        out = []
        for result, inputs, size in zip(results, batched_inputs, images.image_sizes):
            out.append({"instances": detector_postprocess(
                result, inputs.get("height", size[0]), inputs.get("width", size[1]))})
        return out

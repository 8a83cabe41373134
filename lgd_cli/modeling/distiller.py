"""LGDDistiller: a registered detectron2 meta-architecture wrapping a detectron2 student (docs/method.md §1, §6).

Training returns student losses + teacher losses (`.tea`) + `loss_distill`. Inference runs the
student alone, so exported models and their cost are those of the plain detector.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.utils.events import get_event_storage

from lgd_cli.config.choices import DISTILL_GATES
from lgd_cli.errors import ConfigError
from lgd_cli.modeling.lgd import DistillationLoss, pack_objects
from lgd_cli.modeling.lgd.teacher import ImplicitTeacher
from lgd_cli.modeling.students import fcos as _fcos  # noqa: F401  (registers the "FCOS" meta-architecture)
from lgd_cli.modeling.students.dense import DenseSeams
from lgd_cli.modeling.students.rcnn import RCNNSeams, label_map_cells, label_map_crops


def student_seams(student: nn.Module, loss_normalizer: str = "reference") -> DenseSeams | RCNNSeams:
    """The seams of a detectron2 student: one interface for dense detectors and R-CNNs.

    `loss_normalizer` (MODEL.DISTILLATOR.TEACHER.LOSS_NORMALIZER) concerns only RetinaNet/FCOS,
    the students with a running loss normaliser.
    """
    if isinstance(student, DenseDetector):
        return DenseSeams(student, loss_normalizer)
    if isinstance(student, GeneralizedRCNN):
        return RCNNSeams(student)
    raise ConfigError(f"LGD cannot distil a {type(student).__name__}: the student must be RetinaNet, FCOS "
                      "or GeneralizedRCNN (Faster / Mask R-CNN)")


@META_ARCH_REGISTRY.register()
class LGDDistiller(nn.Module):
    """Student detector + implicit teacher + distillation adapter.

    Args:
        student: a detectron2 RetinaNet, FCOS or GeneralizedRCNN (Faster / Mask R-CNN), trained as usual.
        teacher: the implicit teacher, or None for the plain baseline (`--no-lgd`).
        distill_loss: adapter + instance-norm MSE, or None for the baseline.
        add_context_box: pack one whole-image context slot per image for the teacher.
        label_maps: the teacher reads instance masks (LOAD_LABELMAP, Mask R-CNN): 7×7 crops in
            the label descriptor, mask-shaped pooling and rendering regions.
        box_clamp, empty_image: how ground truth becomes object slots (``pack_objects``).
        cell_mapping: how objects land on level cells (as the teacher's), for the label maps.
        loss_normalizer: how the teacher pass meets RetinaNet/FCOS's loss-normaliser EMA.
        The last four default to the official code's rules (docs/method.md §10).
        teacher_trains_head: the teacher's detection losses also train the head it shares with
            the student (the method as published). False: they train the teacher modules only.
        distill_gate: "always" (published), or "teacher_better": a batch's distillation loss
            counts only when the teacher's detection loss on it is below the student's.

    Attributes set by the training hooks (plain Python state, identical on every process):
        distill_active: student features receive the distillation gradient.
        evaluate_teacher: in eval mode, detect from the teacher maps (needs ground truth).
    """

    @configurable
    def __init__(self, *, student: nn.Module, teacher: ImplicitTeacher | None = None,
                 distill_loss: DistillationLoss | None = None, add_context_box: bool = True,
                 label_maps: bool = False, box_clamp: str = "reference", empty_image: str = "reference",
                 cell_mapping: str = "reference", loss_normalizer: str = "reference",
                 teacher_trains_head: bool = True, distill_gate: str = "always"):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.distill_loss = distill_loss
        self.add_context_box = add_context_box
        self.label_maps = label_maps
        self.teacher_trains_head = teacher_trains_head
        if distill_gate not in DISTILL_GATES:
            raise ConfigError(f"unknown distillation gate '{distill_gate}'", hint=f"one of {', '.join(DISTILL_GATES)}")
        self.distill_gate = distill_gate
        self.box_clamp = box_clamp
        self.empty_image = empty_image
        self.cell_mapping = cell_mapping
        self.seams = student_seams(student, loss_normalizer)
        self.strides = self.seams.strides()  # per FPN level, fixed by the backbone
        self.distill_active = True
        self.evaluate_teacher = False

    @classmethod
    def from_config(cls, cfg):
        student = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
        d = cfg.MODEL.DISTILLATOR
        if not d.ENABLED:
            return {"student": student}
        if d.LABEL_ENCODER.LOAD_LABELMAP and not cfg.MODEL.MASK_ON:
            raise ConfigError("MODEL.DISTILLATOR.LABEL_ENCODER.LOAD_LABELMAP reads instance masks, which are "
                              "loaded only with MODEL.MASK_ON=True (Mask R-CNN)")
        channels = cfg.MODEL.FPN.OUT_CHANNELS
        teacher = ImplicitTeacher(
            num_classes=len(cfg.LGD.CLASS_NAMES) or student_seams(student).num_classes,
            channels=channels,
            add_context_box=d.TEACHER.ADD_CONTEXT_BOX,
            detach_appearance=d.TEACHER.DETACH_APPEARANCE_EMBED,
            interact_pattern=d.TEACHER.INTERACT_PATTERN,
            num_heads=d.TEACHER.NR_TRANSFORMER_HEADS,
            category_format=d.LABEL_ENCODER.CATEGORY_FORMAT,
            use_mask_crops=d.LABEL_ENCODER.LOAD_LABELMAP,
            cell_mapping=d.TEACHER.CELL_MAPPING,
        )
        return {
            "student": student,
            "teacher": teacher.to(student.device),
            "distill_loss": DistillationLoss(channels, loss_weight=d.LAMBDA).to(student.device),
            "add_context_box": d.TEACHER.ADD_CONTEXT_BOX,
            "label_maps": d.LABEL_ENCODER.LOAD_LABELMAP,
            "teacher_trains_head": d.TEACHER.HEAD_GRADIENT,
            "distill_gate": d.DISTILL_GATE,
            "box_clamp": d.LABEL_ENCODER.BOX_CLAMP,
            "empty_image": d.LABEL_ENCODER.EMPTY_IMAGE,
            "cell_mapping": d.TEACHER.CELL_MAPPING,
            "loss_normalizer": d.TEACHER.LOSS_NORMALIZER,
        }

    @property
    def device(self):
        return self.student.device

    def student_parameters(self) -> list[nn.Parameter]:
        """What the student optimiser trains: the detector and the distillation adapter."""
        params = list(self.student.parameters())
        return params + (list(self.distill_loss.parameters()) if self.distill_loss is not None else [])

    def teacher_parameters(self) -> list[nn.Parameter]:
        return list(self.teacher.parameters()) if self.teacher is not None else []

    def frozen_backbone_parameters(self) -> list[nn.Parameter]:
        return self.seams.bottom_up_parameters()

    def _teacher_maps(self, images, features, gt_instances) -> tuple[list[Tensor], Tensor]:
        padded = tuple(images.tensor.shape[-2:])
        objects = pack_objects(
            [x.gt_boxes.tensor for x in gt_instances], [x.gt_classes for x in gt_instances],
            list(images.image_sizes), padded, self.add_context_box,
            gt_masks7=label_map_crops(gt_instances) if self.label_maps else None,
            box_clamp=self.box_clamp, empty_image=self.empty_image)
        cells = None
        if self.label_maps:
            shapes = [tuple(f.shape[-2:]) for f in features]
            # is_context, not covers_all: the reference's label map gives an empty image's
            # pseudo box (in the context column) the whole canvas.
            cells = label_map_cells(gt_instances, objects.include, objects.is_context, shapes, self.strides,
                                    padded, self.cell_mapping)
        maps = self.teacher(features, objects, padded, self.strides, cell_masks=cells)
        return maps, objects.valid.any()

    def forward(self, batched_inputs: list[dict]):
        if not self.training:
            return self.inference(batched_inputs)
        if self.teacher is None:
            return self.student(batched_inputs)
        images, features = self.seams.extract(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        targets = self.seams.new_targets()
        teacher_maps, has_objects = self._teacher_maps(images, features, gt_instances)
        # A batch without a single box has nothing to teach: keep the graph (every
        # parameter still gets a gradient, as DDP requires) but let it contribute zero.
        weight = has_objects.to(features[0].dtype)
        # One head call for both passes where that is exact (dense heads); the teacher's logs go under "teacher/".
        losses, teacher_losses = self.seams.student_and_teacher_losses(
            images, features, teacher_maps, gt_instances, targets, teacher_trains_head=self.teacher_trains_head)
        distill_weight = weight
        if self.distill_gate == "teacher_better":
            # A teacher that detects worse than the student on this batch has nothing to pass on.
            # Compared on the device; logging it as distill_gate reads it on the host (this gate only).
            better = sum(teacher_losses.values()).detach() < sum(losses.values()).detach()
            distill_weight = weight * better.to(weight.dtype)
            # Unsmoothed (a 0/1 median says little): the mean of the logged values is the share distilled.
            get_event_storage().put_scalar("distill_gate", distill_weight, smoothing_hint=False)
        losses.update({f"{k}.tea": v * weight for k, v in teacher_losses.items()})
        losses["loss_distill"] = distill_weight * self.distill_loss(
            features, teacher_maps, detach_student=not self.distill_active)
        return losses

    def inference(self, batched_inputs: list[dict]):
        if not self.evaluate_teacher:
            return self.student(batched_inputs)
        if self.teacher is None:
            raise RuntimeError("this model was trained without LGD: it has no teacher to evaluate")
        images, features = self.seams.extract(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        teacher_maps, _ = self._teacher_maps(images, features, gt_instances)
        return self.seams.inference(images, teacher_maps, batched_inputs)


def build_distiller(cfg) -> LGDDistiller:
    """The LGDDistiller around the config's student, on cfg.MODEL.DEVICE."""
    return LGDDistiller(cfg).to(torch.device(cfg.MODEL.DEVICE))

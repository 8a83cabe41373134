"""What every student seam shares: strides, the bottom-up parameters and the FPN maps of a batch."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor, nn

from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage


@contextlib.contextmanager
def parameters_as_constants(modules: list[nn.Module]) -> Iterator[None]:
    """Within the block, `modules` compute as usual and pass gradients to their inputs, but
    their own parameters collect none (autograd records them as constants)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class StudentSeams:
    """Stateless view over a detectron2 detector with an FPN backbone (no parameters of its own).

    Subclasses say which FPN levels the heads read (`in_features`) and how head + loss run on
    given maps.
    """

    def __init__(self, detector: nn.Module):
        self.detector = detector

    @property
    def in_features(self) -> list[str]:
        raise NotImplementedError

    def strides(self) -> list[int]:
        shapes = self.detector.backbone.output_shape()
        return [shapes[f].stride for f in self.in_features]

    def bottom_up_parameters(self) -> list[nn.Parameter]:
        """Parameters of the bottom-up backbone (ResNet/Swin), excluding the FPN."""
        backbone = self.detector.backbone
        return list(getattr(backbone, "bottom_up", backbone).parameters())

    def head_modules(self) -> list[nn.Module]:
        """The modules the teacher pass shares with the student: everything after the FPN."""
        raise NotImplementedError

    def extract(self, batched_inputs: list[dict]) -> tuple[ImageList, list[Tensor]]:
        """Images (padded batch) and FPN maps [(B, C, H_l, W_l)] in `in_features` order."""
        images = self.detector.preprocess_image(batched_inputs)
        features = self.detector.backbone(images.tensor)
        return images, [features[f] for f in self.in_features]

    def student_and_teacher_losses(self, images: ImageList, features: list[Tensor], teacher_maps: list[Tensor],
                                   gt_instances, targets, *, teacher_trains_head: bool = True,
                                   ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """`losses` on the student's maps, then on the teacher's (same targets).

        The heads log statistics (positive anchors, ROI samples): the teacher pass's go under
        "teacher/" instead of overwriting the student's. With `teacher_trains_head` False the
        teacher's losses reach its maps but not the parameters of `head_modules()`.
        """
        student = self.losses(images, features, gt_instances, targets)
        head = contextlib.nullcontext() if teacher_trains_head else parameters_as_constants(self.head_modules())
        with get_event_storage().name_scope("teacher"), head:
            teacher = self.losses(images, teacher_maps, gt_instances, targets)
        return student, teacher

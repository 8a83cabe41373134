"""Distillation loss: adapted student maps vs. the detached teacher maps (docs/method.md §6)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DistillationLoss", "instance_norm"]


def instance_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-image, per-channel normalisation over the spatial cells, without affine.

    Same as ``nn.InstanceNorm2d(affine=False)``, except that a 1×1 map (p7 of a small
    image) gives 0 instead of raising. Always computed in fp32, also inside an autocast region
    (a bf16 variance over a large map loses the digits the loss compares).

    Args:
        x: (B, C, H, W).

    Returns:
        (B, C, H, W), float32 for 16-bit inputs, else the input's dtype.
    """
    with torch.autocast(x.device.type, enabled=False):
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        return (x - mean) * (var + eps).rsqrt()


class DistillationLoss(nn.Module):
    """MSE between instance-normalised adapted student maps and teacher maps.

    One adapter is shared by all levels, as in the reference.

    Args:
        channels: C, the FPN width.
        loss_weight: LAMBDA, the factor on the loss.
    """

    def __init__(self, channels: int, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight
        self.adapter = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, student: list[Tensor], teacher: list[Tensor], detach_student: bool) -> Tensor:
        """Compute ``loss_weight`` × mean squared error over all levels and images.

        Args:
            student: L student FPN maps (B, C, H_l, W_l).
            teacher: L teacher maps of the same shapes; always detached here, so this
                loss never trains the teacher.
            detach_student: stop gradients into the student (the pre-distillation
                window), so only the adapter learns from this loss.

        Returns:
            Scalar loss, float32: under autocast only the adapter's convolutions run in low
            precision; the norms and the squared error are computed in fp32.
        """
        assert len(student) == len(teacher) > 0
        total, count = 0.0, 0
        for s, t in zip(student, teacher):
            if detach_student:
                s = s.detach()
            s = instance_norm(self.adapter(s))
            t = instance_norm(t.detach())
            # Summing per level and dividing once by the element count equals the
            # reference's mean over all levels concatenated per image, without the copy.
            with torch.autocast(s.device.type, enabled=False):
                total = total + (s - t).pow(2).sum()
            count += s.numel()
        return self.loss_weight * total / max(count, 1)

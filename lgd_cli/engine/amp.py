"""Mixed precision for both optimisers: autocast for the forward, one GradScaler (fp16 only) for the two.

SOLVER.AMP.ENABLED (detectron2's key) turns it on; SOLVER.AMP.DTYPE picks bfloat16 (the default: fp32's
range, no scaler needed) or float16 (a torch.amp.GradScaler, shared by the student and teacher
optimisers). What must stay in fp32 says so where it is computed (the distillation loss and its instance
norms, the teacher's attention).
"""
from __future__ import annotations

import contextlib

import torch

from lgd_cli.config.choices import AMP_DTYPES

DTYPES = {name: getattr(torch, dtype) for name, dtype in AMP_DTYPES.items()}  # SOLVER.AMP.DTYPE, lower-cased


class MixedPrecision:
    """What one training step needs to know about precision.

    Args:
        device_type: "cpu" or "cuda" (where the model runs).
        enabled: autocast the forward pass; False keeps every step exactly as in fp32.
        dtype: torch.bfloat16 or torch.float16.
        loss_scaling: use a GradScaler; default: with float16 only (bfloat16 has fp32's range).
    """

    def __init__(self, device_type: str = "cpu", enabled: bool = False, dtype: torch.dtype = torch.bfloat16,
                 loss_scaling: bool | None = None):
        self.device_type = device_type
        self.enabled = enabled
        self.dtype = dtype
        if loss_scaling is None:
            loss_scaling = dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device_type) if enabled and loss_scaling else None

    @classmethod
    def from_config(cls, cfg) -> "MixedPrecision":
        amp = cfg.SOLVER.AMP
        return cls(torch.device(cfg.MODEL.DEVICE).type, bool(amp.ENABLED), DTYPES[amp.DTYPE.lower()])

    def autocast(self):
        """The context the forward pass runs in (a no-op when disabled)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizers) -> torch.Tensor | None:
        """Bring every optimiser's gradients back to their true size (before clipping).

        Returns:
            A 0-dim device tensor > 0 when a gradient overflowed (fp16), or None without a scaler.
            Reading it is left to the caller, which fetches it with the loss values in one sync.
        """
        if self.scaler is None:
            return None
        found = []
        for optimizer in optimizers:
            self.scaler.unscale_(optimizer)
            found += list(self.scaler._found_inf_per_device(optimizer).values())
        if not found:  # no parameter had a gradient
            return torch.zeros((), device=self.device_type)
        return torch.stack([f.to(found[0].device) for f in found]).sum()

    def update(self) -> None:
        """After the step (or the skip): adjust the scale; the next unscale starts afresh."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


"""LGDTrainer: detectron2's training loop with two optimisers and the backbone-freeze window."""
from __future__ import annotations

import time

import torch
from detectron2.engine import SimpleTrainer, TrainerBase
from detectron2.utils import comm

from lgd_cli.errors import LgdError


class NonFiniteLossError(LgdError):
    """A loss term became NaN or infinite; training stops with the terms named."""


def _term_group(name: str) -> str:
    if name.endswith(".tea"):
        return "teacher"
    return "distillation" if name == "loss_distill" else "student"


class LGDTrainer(TrainerBase):
    """One step: forward, backward once, drop frozen gradients, step each optimiser.

    Args:
        model: the model called on a batch (the LGDDistiller, or its DDP wrapper).
        data_loader: an iterable of batches (lists of dataset dicts).
        optimizers: {"student": ..., "teacher": ...} (no teacher for the baseline).
        frozen_parameters: parameters whose gradients are dropped while `freeze_backbone`.
    """

    def __init__(self, model, data_loader, optimizers: dict, frozen_parameters: list):
        super().__init__()
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_loader_iter = iter(data_loader)
        self.optimizers = optimizers
        self.frozen_parameters = frozen_parameters
        self.freeze_backbone = False  # set each step by LgdScheduleHook
        self.checkpointer = None  # an LgdCheckpointer, when there is one, for error messages

    def run_step(self):
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        loss_dict = self.model(data)
        self._check_finite(loss_dict)
        losses = sum(loss_dict.values())
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        losses.backward()
        if self.freeze_backbone:
            # No gradient at all (not a zero one): SGD/AdamW then skip these parameters,
            # so they get no update, no momentum and no weight decay.
            for p in self.frozen_parameters:
                p.grad = None
        SimpleTrainer.write_metrics(loss_dict, data_time)
        for optimizer in self.optimizers.values():
            optimizer.step()

    def _check_finite(self, loss_dict: dict) -> None:
        values = torch.stack([v.detach().float() for v in loss_dict.values()])
        bad = ~torch.isfinite(values)
        if comm.get_world_size() > 1:
            # Every process must stop together, or the others hang in the next all-reduce.
            flag = bad.any().to(torch.int32).reshape(1)
            torch.distributed.all_reduce(flag)
            any_bad = bool(flag.item())
        else:
            any_bad = bool(bad.any())
        if not any_bad:
            return
        terms = [f"{name} ({_term_group(name)}) = {value}" for (name, value), b
                 in zip(loss_dict.items(), bad.tolist()) if b] or ["(on another process)"]
        last = getattr(self.checkpointer, "last_saved", None)
        where = f"last complete checkpoint: {last}" if last else "no checkpoint written yet"
        raise NonFiniteLossError(
            f"non-finite loss at iteration {self.iter}: {', '.join(terms)}; {where}",
            hint="lower MODEL.DISTILLATOR.STUDENT.SOLVER.BASE_LR (and TEACHER), lengthen WARMUP_ITERS, "
                 "or keep SOLVER.CLIP_GRADIENTS.ENABLED=True")

    def state_dict(self):
        state = super().state_dict()
        state["optimizers"] = {k: v.state_dict() for k, v in self.optimizers.items()}
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state_dict["optimizers"][name])

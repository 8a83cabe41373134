"""LGDTrainer: detectron2's training loop with two optimisers and the backbone-freeze window."""
from __future__ import annotations

import logging
import time

import torch
from detectron2.engine import SimpleTrainer, TrainerBase
from detectron2.utils import comm

from lgd_cli.console import print_warning
from lgd_cli.engine.rng import capture_rng_state, restore_rng_state
from lgd_cli.errors import LgdError

logger = logging.getLogger("lgd_cli")


def warn(message: str) -> None:
    """A warning in the run's log and, from the main process, on the terminal."""
    logger.warning(message)
    if comm.is_main_process():
        print_warning(message)


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
        skip_nonfinite: batches with a non-finite loss to skip (no optimiser step, the iteration
            retried on the next batch) before failing with NonFiniteLossError.

    Its state (checkpoints) holds the iteration, both optimisers, the hooks' schedules and, per
    process, the RNG states and the data loader's position, so a resumed run continues the same
    random and data streams.
    """

    def __init__(self, model, data_loader, optimizers: dict, frozen_parameters: list, skip_nonfinite: int = 0):
        super().__init__()
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_loader_iter = iter(data_loader)
        self.optimizers = optimizers
        self.frozen_parameters = frozen_parameters
        self.freeze_backbone = False  # set each step by LgdScheduleHook
        self.checkpointer = None  # an LgdCheckpointer, when there is one, for error messages
        self.skip_nonfinite = skip_nonfinite
        self.nonfinite_skipped = 0  # batches skipped for a non-finite loss, over the whole run
        self._rank_states = None  # (iteration, [resume state of each rank]) from gather_resume_state

    def run_step(self):
        while True:
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time = time.perf_counter() - start
            loss_dict = self.model(data)
            bad = self._nonfinite_terms(loss_dict)
            if not bad:
                break
            if self.nonfinite_skipped >= self.skip_nonfinite:
                raise self._nonfinite_error(bad)
            # Nothing steps: the graph is dropped and the iteration is retried on the next batch.
            self.nonfinite_skipped += 1
            del loss_dict
            warn(f"iteration {self.iter}: non-finite loss {', '.join(bad)}; batch skipped without an "
                 f"optimiser step ({self.nonfinite_skipped} of --skip-nonfinite {self.skip_nonfinite})")
        if self.skip_nonfinite:
            self.storage.put_scalar("nonfinite_skipped", self.nonfinite_skipped, smoothing_hint=False)
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

    def _nonfinite_terms(self, loss_dict: dict) -> list[str]:
        """'name (group) = value' of each non-finite term; the same decision in every process."""
        values = torch.stack([v.detach().float() for v in loss_dict.values()])
        bad = ~torch.isfinite(values)
        if comm.get_world_size() > 1:
            # Every process must skip or stop together, or the others hang in the next all-reduce.
            flag = bad.any().to(torch.int32).reshape(1)
            torch.distributed.all_reduce(flag)
            any_bad = bool(flag.item())
        else:
            any_bad = bool(bad.any())
        if not any_bad:
            return []
        return [f"{name} ({_term_group(name)}) = {value}" for (name, value), b
                in zip(loss_dict.items(), bad.tolist()) if b] or ["(on another process)"]

    def _nonfinite_error(self, terms: list[str]) -> NonFiniteLossError:
        last = getattr(self.checkpointer, "last_saved", None)
        where = f"last complete checkpoint: {last}" if last else "no checkpoint written yet"
        skipped = (f" (after skipping {self.nonfinite_skipped} such batches, the --skip-nonfinite limit)"
                   if self.skip_nonfinite else "")
        return NonFiniteLossError(
            f"non-finite loss at iteration {self.iter}: {', '.join(terms)}{skipped}; {where}",
            hint="lower MODEL.DISTILLATOR.STUDENT.SOLVER.BASE_LR (and TEACHER), lengthen WARMUP_ITERS, "
                 "or keep SOLVER.CLIP_GRADIENTS.ENABLED=True; --skip-nonfinite K skips a few bad batches")

    def _loss_normalizers(self) -> dict:
        """Modules keeping detectron2's loss-normaliser EMA (RetinaNet, FCOS): a float, not in state_dict."""
        model = getattr(self.model, "module", self.model)  # DDP's wrapped model
        return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "loss_normalizer", None), float)}

    def resume_state(self) -> dict:
        """This process's RNG states, data position and loss-normaliser EMAs (as of the end of the step)."""
        state = {"rng": capture_rng_state(),
                 "loss_normalizers": {name: m.loss_normalizer for name, m in self._loss_normalizers().items()}}
        if hasattr(self.data_loader, "state_dict"):
            state["data"] = self.data_loader.state_dict()
        return state

    def gather_resume_state(self) -> None:
        """Collect every process's `resume_state` for the main process's next checkpoint (all call it)."""
        self._rank_states = (self.iter, comm.all_gather(self.resume_state()))

    def state_dict(self):
        state = super().state_dict()
        state["optimizers"] = {k: v.state_dict() for k, v in self.optimizers.items()}
        state["nonfinite_skipped"] = self.nonfinite_skipped
        if comm.get_world_size() == 1:
            ranks = [self.resume_state()]
        elif self._rank_states is not None and self._rank_states[0] == self.iter:
            ranks = self._rank_states[1]
        else:  # a save outside the gathered iterations: the other processes' streams are not known
            ranks = [self.resume_state()]
        state["processes"] = ranks
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state_dict["optimizers"][name])
        self.nonfinite_skipped = int(state_dict.get("nonfinite_skipped", 0))
        ranks, world = state_dict.get("processes"), comm.get_world_size()
        if not ranks:  # written before lgd saved RNG and data positions
            return
        if len(ranks) == world:
            mine = ranks[comm.get_rank()]
            restore_rng_state(mine["rng"])
            model = getattr(self.model, "module", self.model)
            modules = dict(model.named_modules())
            for name, value in mine.get("loss_normalizers", {}).items():
                if name in modules:
                    modules[name].loss_normalizer = float(value)
            if "data" in mine and hasattr(self.data_loader, "load_state_dict"):
                self.data_loader.load_state_dict(mine["data"])
            return
        logger.warning(f"the checkpoint was written by {len(ranks)} processes, this run has {world}: "
                       "random streams restart and the data stream continues approximately")
        if hasattr(self.data_loader, "skip_to"):
            self.data_loader.skip_to((self.iter + 1) * self.data_loader.batch_size)

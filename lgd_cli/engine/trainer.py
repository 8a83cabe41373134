"""LGDTrainer: detectron2's training loop with two optimisers and the backbone-freeze window."""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from detectron2.engine import TrainerBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from lgd_cli.engine.amp import MixedPrecision
from lgd_cli.rng import capture_rng_state, restore_rng_state
from lgd_cli.errors import LGDError

logger = logging.getLogger("lgd_cli")
# fp16 overflows in a row after which the gradients are taken to be non-finite at any loss scale
# (the scale halves each time: 2^16 becomes 2^-16).
MAX_CONSECUTIVE_OVERFLOWS = 32


class NonFiniteLossError(LGDError):
    """A loss term became NaN or infinite; training stops with the terms named."""


def write_metrics(metrics: dict[str, float], data_time: float) -> None:
    """detectron2's SimpleTrainer.write_metrics, from values already on the host (no `.item()` per term)."""
    metrics = {**metrics, "data_time": data_time}
    gathered = comm.gather(metrics)
    if not comm.is_main_process():
        return
    storage = get_event_storage()
    # data_time varies between processes; the slowest is what the step waited for.
    storage.put_scalar("data_time", np.max([x.pop("data_time") for x in gathered]))
    averaged = {k: np.mean([x[k] for x in gathered]) for k in gathered[0]}
    storage.put_scalar("total_loss", sum(averaged.values()))
    if len(averaged) > 1:
        storage.put_scalars(**averaged)


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
        amp: mixed precision (SOLVER.AMP); None is fp32.

    Its state (checkpoints) holds the iteration, both optimisers, the fp16 loss scale, the hooks' schedules and, per
    process, the RNG states and the data loader's position, so a resumed run continues the same
    random and data streams.
    """

    def __init__(self, model, data_loader, optimizers: dict, frozen_parameters: list, skip_nonfinite: int = 0,
                 amp: MixedPrecision | None = None):
        super().__init__()
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_loader_iter = iter(data_loader)
        self.optimizers = optimizers
        self.frozen_parameters = frozen_parameters
        self.freeze_backbone = False  # set each step by LGDScheduleHook
        self.checkpointer = None  # an LGDCheckpointer, when there is one, for error messages
        self.skip_nonfinite = skip_nonfinite
        self.nonfinite_skipped = 0  # batches skipped for a non-finite loss, over the whole run
        self.amp = amp or MixedPrecision()
        self.amp_skipped = 0  # batches skipped for an fp16 gradient overflow, over the whole run
        self._rank_states = None  # (iteration, [resume state of each rank]) from gather_resume_state
        # Signal number a stop was asked with in this process (GracefulStopHook sets the source), and
        # its maximum over all processes as of this step: reduced with the loss values, in the same
        # all-reduce, so the hook needs no collective (and no host sync) of its own.
        self.stop_signal_source = lambda: 0
        self.stop_signal_all = 0

    def run_step(self):
        consecutive_overflows = 0
        while True:
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time = time.perf_counter() - start
            with self.amp.autocast():
                loss_dict = self.model(data)
            # The loss values go to the host once per step, fetched together with the fp16
            # overflow flag after the backward pass has been queued: the device never waits for
            # the host between forward and backward, and a non-finite batch costs one wasted backward.
            values = torch.stack([v.detach().float() for v in loss_dict.values()])
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            self.amp.backward(sum(loss_dict.values()))
            if self.freeze_backbone:
                # No gradient at all (not a zero one): SGD/AdamW then skip these parameters,
                # so they get no update, no momentum and no weight decay.
                for p in self.frozen_parameters:
                    p.grad = None
            # Unscaled before the optimisers' wrappers clip by value (SOLVER.CLIP_GRADIENTS).
            overflow = self.amp.unscale(self.optimizers.values())
            host_values, bad, overflowed = self._fetch(values, overflow)
            if bad:
                self.amp.update()
                if self.nonfinite_skipped >= self.skip_nonfinite:
                    raise self._nonfinite_error(self._nonfinite_terms(loss_dict, host_values))
                # Nothing steps: the graph is dropped and the iteration is retried on the next batch.
                self.nonfinite_skipped += 1
                terms = ", ".join(self._nonfinite_terms(loss_dict, host_values))
                del loss_dict
                logger.warning(f"iteration {self.iter}: non-finite loss {terms}; batch skipped without an "
                     f"optimiser step ({self.nonfinite_skipped} of --skip-nonfinite {self.skip_nonfinite})")
                continue
            if overflowed:
                # fp16 gradients overflowed at this scale: the scaler lowers it, nothing steps and
                # the iteration is retried on the next batch, like a non-finite loss (not counted
                # against --skip-nonfinite: lowering the scale is the remedy).
                self.amp.update()
                self.amp_skipped += 1
                consecutive_overflows += 1
                del loss_dict
                logger.info(f"iteration {self.iter}: fp16 gradients overflowed; step skipped, loss scale lowered "
                            f"({self.amp_skipped} so far)")
                if consecutive_overflows >= MAX_CONSECUTIVE_OVERFLOWS:
                    raise NonFiniteLossError(
                        f"non-finite gradients at iteration {self.iter} on {consecutive_overflows} batches in a row, "
                        "whatever the fp16 loss scale",
                        hint="train in bfloat16 (SOLVER.AMP.DTYPE=bfloat16) or fp32 (SOLVER.AMP.ENABLED=False)")
                continue
            break
        if self.skip_nonfinite:
            self.storage.put_scalar("nonfinite_skipped", self.nonfinite_skipped, smoothing_hint=False)
        if self.amp.scaler is not None:
            self.storage.put_scalar("amp_skipped", self.amp_skipped, smoothing_hint=False)
        write_metrics(dict(zip(loss_dict, host_values)), data_time)
        for optimizer in self.optimizers.values():
            optimizer.step()
        self.amp.update()

    def _fetch(self, values: torch.Tensor, overflow: torch.Tensor | None) -> tuple[list[float], bool, bool]:
        """(loss values, any non-finite, fp16 overflow): the step's one device-to-host copy (and, with
        several processes, its one all-reduce, which also carries the stop signal).

        The decisions are the same in every process, which all skip or stop together (or the
        others would hang in the next all-reduce).
        """
        flags = torch.stack([(~torch.isfinite(values)).any().float(),
                             overflow.float().to(values.device) if overflow is not None else values.new_zeros(()),
                             values.new_full((), float(self.stop_signal_source()))])
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        host = torch.cat([values, flags]).tolist()
        self.stop_signal_all = int(host[-1])
        return host[:-3], host[-3] > 0, host[-2] > 0

    def _nonfinite_terms(self, loss_dict: dict, host_values: list[float]) -> list[str]:
        """'name (group) = value' of each non-finite term of this process."""
        return [f"{name} ({_term_group(name)}) = {value}" for name, value in zip(loss_dict, host_values)
                if not math.isfinite(value)] or ["(on another process)"]

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
        if self.amp.scaler is not None:
            state["grad_scaler"] = self.amp.state_dict()
            state["amp_skipped"] = self.amp_skipped
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
        self.amp.load_state_dict(state_dict.get("grad_scaler", {}))
        self.amp_skipped = int(state_dict.get("amp_skipped", 0))
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

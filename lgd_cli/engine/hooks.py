"""Training hooks: LR schedules and LGD windows, progress bars, checkpoint bookkeeping, graceful stop."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
from detectron2.engine import BestCheckpointer, HookBase, PeriodicCheckpointer
from detectron2.utils import comm

from lgd_cli.errors import LGDError
from lgd_cli.files import read_metrics


def collective_device() -> torch.device:
    """Where a tensor for an all-reduce must live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distillation_active(iteration: int, pre: int, post: int, max_iter: int) -> bool:
    """The reference's rule: distillation is off while iter < PRE or iter > MAX_ITER - POST."""
    return not (iteration < pre or iteration > max_iter - post)


class LGDScheduleHook(HookBase):
    """Everything that depends on the iteration: both LR schedules and the two LGD windows.

    One hook for both schedulers (detectron2's LRScheduler hook keys its saved state by class
    name, so two instances would overwrite each other in a checkpoint).

    Args:
        model: the unwrapped LGDDistiller (its `distill_active` flag is set before each step).
        schedulers: {"student": ..., "teacher": ...}.
        pre_nondistill, post_nondistill, freeze_iters: the window lengths in iterations.
    """

    def __init__(self, model, schedulers: dict, pre_nondistill: int, post_nondistill: int, freeze_iters: int):
        self.model = model
        self.schedulers = schedulers
        self.pre, self.post, self.freeze_iters = pre_nondistill, post_nondistill, freeze_iters

    def before_step(self):
        it = self.trainer.iter
        self.model.distill_active = distillation_active(it, self.pre, self.post, self.trainer.max_iter)
        self.trainer.freeze_backbone = it < self.freeze_iters

    def after_step(self):
        storage = self.trainer.storage
        for name, scheduler in self.schedulers.items():
            storage.put_scalar(f"lr_{name}", scheduler.optimizer.param_groups[0]["lr"], smoothing_hint=False)
            scheduler.step()
        storage.put_scalar("distill_active", float(self.model.distill_active), smoothing_hint=False)

    def state_dict(self):
        return {name: s.state_dict() for name, s in self.schedulers.items()}

    def load_state_dict(self, state_dict):
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state_dict[name])


class GatherResumeStateHook(HookBase):
    """With several processes: before each periodic checkpoint, collect every process's RNG states and
    data position, so the main process's checkpoint continues all their streams (LGDTrainer.state_dict).

    Place it before the PeriodicCheckpointer; `period` is the checkpoint period.
    """

    def __init__(self, period: int):
        self.period = period

    def after_step(self):
        it = self.trainer.iter
        if comm.get_world_size() > 1 and ((it + 1) % self.period == 0 or it >= self.trainer.max_iter - 1):
            self.trainer.gather_resume_state()


class FinalCheckpointer(PeriodicCheckpointer):
    """detectron2's PeriodicCheckpointer, but the last iteration is saved once, as model_final.

    fvcore's saves it twice when MAX_ITER is a multiple of the period (model_{MAX_ITER-1} and an
    identical model_final); resuming reads last_checkpoint, which then names model_final.
    """

    def step(self, iteration: int, **kwargs):
        if self.max_iter is not None and int(iteration) >= self.max_iter - 1:
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=int(iteration), **kwargs)
            return
        super().step(iteration, **kwargs)


class ProgressHook(HookBase):
    """A progress bar: iteration, elapsed, ETA, total loss and the main terms (main process only).

    Args:
        display: the CLI's Display (lgd_cli/engine/display.py); nothing is drawn where it has no bars.
    """

    TERMS = ("loss_cls", "loss_box_reg", "loss_distill")

    def __init__(self, display, period: int = 5):
        self.display = display
        self.period = period
        self.progress = None

    def before_train(self):
        if not comm.is_main_process():
            return
        self.progress = self.display.progress()
        if self.progress is None:
            return
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.trainer.max_iter,
                                           completed=self.trainer.start_iter, detail="")

    def after_step(self):
        if self.progress is None:
            return
        it = self.trainer.iter + 1
        if it % self.period and it != self.trainer.max_iter:
            return
        latest = self.trainer.storage.latest_with_smoothing_hint(20)
        parts = [f"loss {latest['total_loss'][0]:.3f}"] if "total_loss" in latest else []
        parts += [f"{k.replace('loss_', '')} {latest[k][0]:.3f}" for k in self.TERMS if k in latest]
        if "loss_cls.tea" in latest:
            parts.append(f"cls.tea {latest['loss_cls.tea'][0]:.3f}")
        self.progress.update(self.task, completed=it, detail="  ".join(parts))

    def after_train(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class TrainingStopped(LGDError):
    """SIGINT/SIGTERM arrived: the current iteration finished and a checkpoint was written."""


class GracefulStopHook(HookBase):
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop (exit 130/143). A second one aborts at once.

    What schedulers send before pre-emption is SIGTERM; losing at most the current step
    beats losing everything since the last periodic checkpoint.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer
        self.received = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)  # second signal: abort now
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def before_train(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        if hasattr(self.trainer, "stop_signal_source"):  # LGDTrainer reduces it with the loss values
            self.trainer.stop_signal_source = lambda: self.received or 0

    def after_step(self):
        received = self.received or 0
        if comm.get_world_size() > 1:
            # Every process stops at the same iteration (the signal may reach only one): the
            # maximum over the processes, from the step's own all-reduce where the trainer made one
            # (a signal that came after it is seen at the next step, by every process alike).
            if hasattr(self.trainer, "stop_signal_all"):
                received = self.trainer.stop_signal_all
            else:
                flag = torch.tensor([received], dtype=torch.int64, device=collective_device())
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                received = int(flag.item())
        if not received:
            return
        name = f"model_{self.trainer.iter:07d}"
        if comm.get_world_size() > 1:
            self.trainer.gather_resume_state()
        if comm.is_main_process():
            self.checkpointer.save(name)
        comm.synchronize()
        signame = signal.Signals(received).name
        raise TrainingStopped(f"stopped by {signame} after iteration {self.trainer.iter}; "
                              f"checkpoint {name}.pth written in {self.checkpointer.save_dir}",
                              hint="resume with the same command plus --resume",
                              exit_code=128 + received)

    def after_train(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class ResumableBestCheckpointer(BestCheckpointer):
    """detectron2's BestCheckpointer, but a resumed run starts from the best score already reached.

    detectron2 keeps the best score in memory only, so the first evaluation after --resume would
    replace model_best.pth however it scored. The scores of the evaluations before the resumed
    iteration are read back from `metrics_file`, where each was logged (train.py repairs it to
    those iterations before training resumes).
    """

    def __init__(self, *args, metrics_file: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics_file = Path(metrics_file)

    def before_train(self):
        best_file = Path(self._checkpointer.save_dir) / f"{self._file_prefix}.pth"
        if self.trainer.start_iter == 0 or not best_file.is_file():
            return
        for row in read_metrics(self.metrics_file):
            value = row.get(self._val_metric)
            if row["iteration"] < self.trainer.start_iter and value is not None and (
                    self.best_metric is None or self._compare(value, self.best_metric)):
                self._update_best(value, row["iteration"])
        if self.best_metric is not None:
            self._logger.info(f"{self._val_metric} to beat for {best_file.name}: {self.best_metric:0.5f} "
                              f"(iteration {self.best_iter})")

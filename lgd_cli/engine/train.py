"""train(cfg): output folder, datasets, model, optimisers, trainer and hooks, in one or many processes."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import hooks as d2hooks
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import TensorboardXWriter

from lgd_cli.data.datasets import VAL_DATASET, register_config_datasets
from lgd_cli.data.loader import build_train_loader
from lgd_cli.engine.amp import MixedPrecision
from lgd_cli.engine.checkpoint import LGDCheckpointer
from lgd_cli.engine.hooks import (FinalCheckpointer, GatherResumeStateHook, GracefulStopHook, LGDScheduleHook,
                                  ProgressHook, ResumableBestCheckpointer)
from lgd_cli.engine.launch import JOIN_TIMEOUT_S, check_processes, launch, report_failure
from lgd_cli.engine.logs import OrderedJSONWriter, TrainingLogWriter, log_banner, log_to_file
from lgd_cli.engine.optimizers import build_optimizers
from lgd_cli.engine.run_folder import RunFolderLock, check_resumable, clear_run, holds_run, prepare_output
from lgd_cli.engine.trainer import LGDTrainer
from lgd_cli.errors import ConfigError, LGDError
from lgd_cli.files import atomic_write_bytes, atomic_write_json, finite_or_null, repair_json_lines
from lgd_cli.modeling.backbones.pretrained import load_pretrained_weights, resolve_weights_path
from lgd_cli.modeling.distiller import build_distiller
from lgd_cli.rng import preserved_rng

logger = logging.getLogger("lgd_cli")
# model_best.pth: the checkpoint of the best periodic evaluation by this metric (TEST.EVAL_PERIOD > 0).
BEST_METRIC, BEST_CHECKPOINT = "student/bbox/AP", "model_best"
METRICS_FILE = "metrics.json"  # detectron2's JSONWriter file, one line per logged iteration
# Config keys that may differ between the machines of one run: paths on each machine's own disks.
MACHINE_KEYS = ("OUTPUT_DIR", "MODEL.WEIGHTS", "LGD.DATA.ROOT", "LGD.DATA.TRAIN_JSON", "LGD.DATA.TRAIN_IMAGES",
                "LGD.DATA.VAL_JSON", "LGD.DATA.VAL_IMAGES")


def _flat_config(node, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        elif f"{prefix}{key}" not in MACHINE_KEYS:
            flat[f"{prefix}{key}"] = repr(value)
    return flat


def train(cfg, output: Path, *, resume: bool = False, force: bool = False, num_processes: int = 1,
          num_machines: int = 1, machine_rank: int = 0, dist_url: str = "auto",
          join_timeout: float = JOIN_TIMEOUT_S, resume_required: bool = False, display=None) -> dict:
    """Train (LGD or, with MODEL.DISTILLATOR.ENABLED=False, the baseline) into `output`.

    Inputs are validated before anything is written or any process starts. With several machines
    (the same command on each, only `machine_rank` differing), only machine 0 looks at and writes
    the run folder (config, checkpoints, metrics, summary): the others' `output`, shared with it or
    their own, gets only their processes' `log.txt.rankN`. Machine 0's launcher (this process) holds
    the folder's lock for the whole run: a second run into it is refused, naming this one.

    Args:
        resume: continue the run in `output` from its newest complete checkpoint (a fresh start
            when it holds none; an error with `resume_required`); a run already trained to MAX_ITER
            raises RunFinished and changes nothing.

    `display` (lgd_cli/engine/display.py) shows the progress bars; None: none, the log only.

    Returns:
        The run summary (also written to output/summary.json by machine 0), on every machine.
    """
    output = Path(output)
    use_cuda = cfg.MODEL.DEVICE.startswith("cuda")
    main_machine = machine_rank == 0
    existed = output.exists()
    lock = RunFolderLock(output) if main_machine else None
    try:
        check_processes(num_processes, num_machines, machine_rank, use_cuda=use_cuda, dist_url=dist_url)
        if resume and force:
            raise ConfigError("--resume and --force contradict each other: continue the run, or start afresh")
        register_config_datasets(cfg)
        if cfg.MODEL.WEIGHTS and not resume:
            resolve_weights_path(cfg.MODEL.WEIGHTS)  # a missing file or a URL fails before anything is written
        if main_machine:
            if resume and resume_required:
                check_resumable(output)
            lock.acquire()  # before --force may clear anything: a live run's folder stays as it is
            prepare_output(output, resume, force, max_iter=cfg.SOLVER.MAX_ITER)
    except LGDError as exc:
        if lock is not None:
            _release(lock, output, existed)
        report_failure(exc, num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url,
                       wait_s=min(10.0, join_timeout))
        raise
    fresh = main_machine and not holds_run(output)
    try:
        if main_machine:
            atomic_write_bytes(output / "config.yaml", lambda f: f.write(cfg.dump().encode()))
        return launch(_train_worker, num_processes, num_machines=num_machines, machine_rank=machine_rank,
                      dist_url=dist_url, use_cuda=use_cuda, join_timeout=join_timeout,
                      agree={"--resume": resume, "config": _flat_config(cfg)}, args=(cfg, str(output), resume, display))
    except LGDError:
        # A user-fixable error (bad image, bad weights, NaN, a machine missing...) before the first
        # checkpoint of a new run: leave the folder as it was, so the fixed command runs without --force.
        if fresh and not any(output.glob("model_*.pth")):
            clear_run(output)
            _release(lock, output, existed)
        raise
    finally:
        if lock is not None:
            lock.release()


def _release(lock: RunFolderLock, output: Path, existed: bool) -> None:
    """Free the lock; a folder this run created goes too (lock file included) when nothing else is in it."""
    lock.release(remove=not existed)
    if not existed and output.is_dir() and not any(output.iterdir()):
        output.rmdir()


def _resume_checkpoint(checkpointer, output: Path, on_gpu: bool) -> tuple[str, str, bool] | None:
    """The checkpoint the main process resumes from, as (file this process loads, its name on machine 0,
    whether the file is a temporary copy), or None for a fresh start.

    Where the run folder is shared, every process loads the same file. A process that does not see
    it (its machine has its own folder) gets the main process's bytes, broadcast, in a temporary file
    outside the run folder: its machine's --output never holds a checkpoint.
    """
    if comm.get_world_size() == 1:
        path = checkpointer.resume_path()
        return (path, path, False) if path else None
    found = None
    if comm.is_main_process():
        path = checkpointer.resume_path()
        if path:
            stat = os.stat(path)
            found = {"path": path, "name": Path(path).name, "size": stat.st_size, "mtime": stat.st_mtime_ns}
    found = comm.all_gather(found)[0]
    if found is None:
        return None
    local = output / found["name"]
    try:
        stat = local.stat()
        same = (stat.st_size, stat.st_mtime_ns) == (found["size"], found["mtime"])
    except OSError:
        same = False
    if all(comm.all_gather(same)):
        return str(local), found["path"], False
    device = torch.device("cuda", comm.get_local_rank()) if on_gpu else torch.device("cpu")
    if comm.is_main_process():
        data = torch.frombuffer(bytearray(Path(found["path"]).read_bytes()), dtype=torch.uint8).to(device)
    else:
        data = torch.empty(found["size"], dtype=torch.uint8, device=device)
    torch.distributed.broadcast(data, src=0)
    if same:
        return str(local), found["path"], False
    fd, copy = tempfile.mkstemp(prefix="lgd-resume-", suffix=".pth")
    with os.fdopen(fd, "wb") as f:
        data.cpu().numpy().tofile(f)
    return copy, found["path"], True


def _train_worker(cfg, output: str, resume: bool, display=None) -> dict | None:
    rank = comm.get_rank()
    if display is not None and rank == 0 and comm.get_world_size() > 1:
        display.join_process()  # a spawned process: its warnings reach the terminal as the CLI's would
    if rank != 0:
        Path(output).mkdir(parents=True, exist_ok=True)  # another machine's own folder, for its log
    log_to_file(Path(output) / ("log.txt" if rank == 0 else f"log.txt.rank{rank}"))
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    evaluates = cfg.TEST.EVAL_PERIOD > 0 or cfg.LGD.EVAL_AT_END
    register_config_datasets(cfg, splits=("train", "val") if evaluates else ("train",))

    model = build_distiller(cfg)
    optimizers, schedulers = build_optimizers(cfg, model)
    # Re-seed so that the data order and augmentation do not depend on how many random numbers
    # the model drew: LGD (more modules) and --no-lgd runs of one seed see the same batches.
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    train_model = model
    if comm.get_world_size() > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[comm.get_local_rank()] if cfg.MODEL.DEVICE.startswith("cuda") else None,
            broadcast_buffers=False)
    trainer = LGDTrainer(train_model, build_train_loader(cfg, skip_bad_images=cfg.LGD.DATA.SKIP_BAD_IMAGES),
                         optimizers, model.frozen_backbone_parameters(), skip_nonfinite=cfg.LGD.SKIP_NONFINITE,
                         amp=MixedPrecision.from_config(cfg))
    checkpointer = LGDCheckpointer(model, output, cfg, trainer=trainer)
    trainer.checkpointer = checkpointer  # named in error messages (the newest complete checkpoint)
    evaluations = Evaluations()
    trainer.register_hooks(_hooks(cfg, model, schedulers, checkpointer, output, display, evaluations))

    start_iter = 0
    found = _resume_checkpoint(checkpointer, Path(output), cfg.MODEL.DEVICE.startswith("cuda")) if resume else None
    path = None
    if found:
        local, path, copy = found
        try:
            checkpointer.load(local)
        finally:
            if copy:
                os.unlink(local)
        checkpointer.last_saved = path
        start_iter = trainer.iter + 1
        logger.info(f"resuming from {path} at iteration {start_iter}" + (" (sent by the main process)" if copy else ""))
    if start_iter >= cfg.SOLVER.MAX_ITER:
        finished = _finished_summary(Path(output), cfg) if comm.is_main_process() else None
        if comm.get_world_size() > 1:
            finished = comm.all_gather(finished)[0]
        if finished is not None:
            logger.info(f"{output} already finished its {cfg.SOLVER.MAX_ITER} iterations: nothing to train, "
                        "summary.json and metrics.json kept")
            return finished if comm.is_main_process() else None
    if comm.is_main_process():
        log_banner(cfg, Path(output), start_iter=start_iter, processes=comm.get_world_size(),
                   train_images=len(trainer.data_loader.dataset),
                   val_images=len(DatasetCatalog.get(VAL_DATASET)) if evaluates else None, resumed_from=path)
    if resume and comm.is_main_process():
        # A kill can tear the last line; lines of iterations about to be redone would repeat.
        repair_json_lines(Path(output) / METRICS_FILE, keep=lambda rec: rec.get("iteration", -1) < start_iter)
    if not path and cfg.MODEL.WEIGHTS:
        load_pretrained_weights(model.student, cfg)
    # TorchScript runs a scripted function (detectron2's sigmoid_focal_loss_jit) unoptimised on its
    # first calls in a process, then through an optimised, fused plan that rounds differently: a
    # resumed process would not continue bit-identically. The plain interpreter costs nothing that shows.
    with torch.jit.optimized_execution(False):
        trainer.train(start_iter, cfg.SOLVER.MAX_ITER)
    if comm.is_main_process():
        histories = trainer.storage.histories()  # empty when a finished run is resumed
        summary = {
            "output": output,
            "iterations": cfg.SOLVER.MAX_ITER,
            "lgd": bool(cfg.MODEL.DISTILLATOR.ENABLED),
            "final_checkpoint": str(Path(output) / "model_final.pth"),
            "s_per_iter": histories["time"].global_avg() if "time" in histories else None,
            "total_loss": histories["total_loss"].median(20) if "total_loss" in histories else None,
            "skipped_images": len(trainer.data_loader.skipped),
            "nonfinite_skipped": trainer.nonfinite_skipped,
            "amp_skipped": trainer.amp_skipped,
        }
        if evaluations.final is not None:
            summary["evaluation"] = finite_or_null({"iteration": cfg.SOLVER.MAX_ITER,
                                                    "dataset": MetadataCatalog.get(VAL_DATASET).json_file,
                                                    **evaluations.final})
        if start_iter >= cfg.SOLVER.MAX_ITER:
            # A finished run resumed without a usable summary.json: keep what the old one knew
            # (the step time and loss of iterations this process did not run).
            previous = _read_summary(Path(output))
            summary = {**previous, **{k: v for k, v in summary.items() if v is not None}}
        atomic_write_json(Path(output) / "summary.json", summary)
        return summary
    return None


def _read_summary(output: Path) -> dict:
    try:
        previous = json.loads((output / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return previous if isinstance(previous, dict) else {}


def _finished_summary(output: Path, cfg) -> dict | None:
    """summary.json of a run that finished with this config's iterations (and its final evaluation where
    LGD.EVAL_AT_END asks for one), or None: resuming it has something left to do."""
    summary = _read_summary(output)
    if summary.get("iterations") != cfg.SOLVER.MAX_ITER or not (output / "model_final.pth").is_file():
        return None
    if cfg.LGD.EVAL_AT_END and "evaluation" not in summary:
        return None
    return summary


class Evaluations:
    """The results of the evaluation after the last iteration, once EvalHook ran it (main process)."""

    def __init__(self):
        self.final: dict | None = None


class LGDEvalHook(d2hooks.EvalHook):
    """detectron2's EvalHook (every `eval_period`, and after the last iteration) whose final evaluation
    can be turned off (LGD.EVAL_AT_END=False), and never follows a failed or stopped training.

    detectron2's also evaluates when the last iteration raised (its test is iter + 1 >= max_iter);
    the loop leaves iter at max_iter or more only when it finished.
    """

    def __init__(self, eval_period: int, eval_function, at_end: bool = True):
        super().__init__(eval_period, eval_function)
        self.at_end = at_end

    def after_train(self):
        if self.at_end and self.trainer.iter >= self.trainer.max_iter:
            self._do_eval()
        del self._func  # as detectron2's: the closure holds the trainer


def _hooks(cfg, model, schedulers, checkpointer, output: str, display=None, evaluations: Evaluations | None = None) -> list:
    d = cfg.MODEL.DISTILLATOR
    hooks = [
        d2hooks.IterationTimer(),
        LGDScheduleHook(model, schedulers, d.PRE_NONDISTILL_ITERS, d.POST_NONDISTILL_ITERS,
                        d.PRE_FREEZE_STUDENT_BACKBONE_ITERS),
    ]
    if comm.get_world_size() > 1:
        hooks.append(GatherResumeStateHook(cfg.SOLVER.CHECKPOINT_PERIOD))
    if comm.is_main_process():
        hooks.append(FinalCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=cfg.LGD.CHECKPOINT_KEEP))
    hooks.append(GracefulStopHook(checkpointer))
    if cfg.TEST.EVAL_PERIOD > 0 or cfg.LGD.EVAL_AT_END:
        from lgd_cli.engine.evaluate import evaluate_model

        evaluations = evaluations or Evaluations()
        hook = LGDEvalHook(cfg.TEST.EVAL_PERIOD, lambda: _periodic_eval(cfg, hook.trainer, model, output, evaluate_model,
                                                                        evaluations, display),
                           at_end=cfg.LGD.EVAL_AT_END)
        hooks.append(hook)
        if cfg.TEST.EVAL_PERIOD > 0 and comm.is_main_process():
            # After the EvalHook, whose results it reads; model_best.pth is never resumed from.
            hooks.append(ResumableBestCheckpointer(cfg.TEST.EVAL_PERIOD, checkpointer, BEST_METRIC, mode="max",
                                                   file_prefix=BEST_CHECKPOINT,
                                                   metrics_file=Path(output) / METRICS_FILE))
    if comm.is_main_process():
        hooks.append(d2hooks.PeriodicWriter([OrderedJSONWriter(str(Path(output) / METRICS_FILE)),
                                             TensorboardXWriter(output),
                                             TrainingLogWriter(cfg.SOLVER.MAX_ITER, cfg.MODEL.DEVICE)],
                                            period=cfg.LGD.LOG_PERIOD))
        if display is not None:
            hooks.append(ProgressHook(display))
    return hooks


def _periodic_eval(cfg, trainer, model, output, evaluate_model, evaluations: Evaluations, display) -> dict:
    # Evaluation draws no number from the training RNGs: a resumed run (which does not repeat
    # the evaluation at its checkpoint) continues the same random stream.
    with preserved_rng():
        results = {"student": evaluate_model(cfg, model, Path(output) / "eval", teacher=False, display=display)}
        if cfg.MODEL.DISTILLATOR.ENABLED and cfg.MODEL.DISTILLATOR.EVAL_TEACHER:
            results["teacher"] = evaluate_model(cfg, model, Path(output) / "eval-teacher", teacher=True,
                                                display=display)
    done = min(trainer.iter + 1, trainer.max_iter)  # after_train runs with iter == max_iter
    if done >= trainer.max_iter:
        evaluations.final = results  # evaluate_model's own copies
    if comm.is_main_process():
        logger.info(f"evaluation after {done} iterations: " + "; ".join(
            f"{who} {task} " + "  ".join(f"{k} {_number(metrics.get(k))}" for k in ("AP", "AP50", "AP75"))
            for who, res in results.items() for task, metrics in res.items()))
    # EvalHook writes these flattened into metrics.json / TensorBoard.
    return {f"{who}/{task}": metrics for who, res in results.items() for task, metrics in res.items()}


def _number(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) and math.isfinite(value) else "n/a"

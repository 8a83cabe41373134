"""`lgd benchmark`: what LGD costs over the plain detector, measured on the same model, data and batch.

Each arm (baseline, LGD) runs in its own fresh process so that its peak memory is its own
(process RSS on CPU, `torch.cuda.max_memory_allocated` on GPU). A step is `lgd train`'s own
(LGDTrainer.run_step: mixed precision per SOLVER.AMP, the metrics it writes, its host syncs).
Step times are the median (with min and max) over the timed steps after warm-up, with warnings
where their spread or the machine's load makes the LGD / baseline ratio unreliable; FLOPs come from
torch.utils.flop_counter on one training step.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import queue as queue_module
import statistics
import time
from typing import NamedTuple

from lgd_cli.compat import detectron2 as _compat

import torch
from detectron2.data import build_detection_train_loader
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from torch.utils.flop_counter import FlopCounterMode

from lgd_cli.config.build import SavedConfig, build_config
from lgd_cli.engine.amp import MixedPrecision
from lgd_cli.engine.optimizers import build_optimizers
from lgd_cli.engine.resources import cpu_load, peak_memory_mb
from lgd_cli.data.datasets import register_config_datasets
from lgd_cli.modeling.distiller import build_distiller
from lgd_cli.engine.trainer import LGDTrainer
from lgd_cli.errors import LGDError


# What each arm changes in the benchmarked config.
ARM_OVERRIDES = {"baseline": ("MODEL.DISTILLATOR.ENABLED=False",), "lgd": ("MODEL.DISTILLATOR.ENABLED=True",)}


def _arm_config(cfg, lgd: bool):
    """`cfg` with the LGD or baseline arm's overrides, built (and checked) by build_config."""
    return build_config(SavedConfig.of(cfg, origin="the benchmarked config"), ARM_OVERRIDES["lgd" if lgd else "baseline"],
                        device=cfg.MODEL.DEVICE)


def _set_steady_state(model, trainer) -> None:
    """Measure the state most training steps run in: distillation reaching the student, the backbone
    trained. The benchmark installs no LGDScheduleHook, so the config's window keys
    (PRE_NONDISTILL_ITERS, PRE_FREEZE_STUDENT_BACKBONE_ITERS...) never act here: the state is set
    where the hook sets it."""
    model.distill_active = True
    trainer.freeze_backbone = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_name(cfg) -> str:
    return cfg.SOLVER.AMP.DTYPE.lower() if cfg.SOLVER.AMP.ENABLED else "fp32"


def _measure_arm(cfg, lgd: bool, iters: int, warmup: int, profile: bool, export: bool = False,
                 inference: bool = True) -> dict:
    """One arm in the current process: step times, peak memory, parameters, FLOPs, (profile)."""
    cfg = _arm_config(cfg, lgd)
    seed_all_rng(0)
    register_config_datasets(cfg, splits=("train",))
    device = torch.device(cfg.MODEL.DEVICE)
    model = build_distiller(cfg).train()
    optimizers, _ = build_optimizers(cfg, model)
    # The same batches, in the same order, for both arms.
    batches = list(itertools.islice(iter(build_detection_train_loader(cfg)), 4))

    trainer = LGDTrainer(model, itertools.cycle(batches), optimizers, model.frozen_backbone_parameters(),
                         amp=MixedPrecision.from_config(cfg))
    _set_steady_state(model, trainer)

    with EventStorage(0) as storage:
        trainer.storage = storage
        times = StepTimes.of(_step_seconds(trainer.run_step, iters, warmup, device))
        with FlopCounterMode(display=False) as counter:
            trainer.run_step()
        result = {
            "s_per_iter": times.median, "s_per_iter_min": times.min, "s_per_iter_max": times.max,
            "images_per_s": cfg.SOLVER.IMS_PER_BATCH / times.median,
            "peak_mb": peak_memory_mb(device),
            "train_gflops": counter.get_total_flops() / 1e9,
            "params_student": sum(p.numel() for p in model.student.parameters()),
            "params_lgd_only": sum(p.numel() for p in model.teacher_parameters())
            + (sum(p.numel() for p in model.distill_loss.parameters()) if model.distill_loss is not None else 0),
        }
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with torch_profile(activities=activities, record_shapes=False) as prof:
                for _ in range(2):
                    trainer.run_step()
            result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    if not lgd and inference:
        model.eval()
        image = batches[0][0]["image"].to(device).float()
        with torch.no_grad():
            result["inference_ms_per_image"] = 1000 * statistics.median(_step_seconds(
                lambda: model([{"image": image}]), iters, warmup, device))
        if export:
            result["export_ms_per_image"] = _export_latencies(model.student, image.cpu(), iters, warmup)
    return result


def _export_latencies(student, image, iters: int, warmup: int) -> dict:
    """Latency of the TorchScript and ONNX exports of `student` on `image` (CPU), in ms."""
    import tempfile
    from pathlib import Path

    from lgd_cli.export import trace, verify

    student = student.cpu().eval()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, write in (("torchscript", trace.export_torchscript), ("onnx", trace.export_onnx)):
            path = Path(tmp) / f"model.{fmt}"
            write(student, image, path)
            run = verify.load_exported(path, fmt)
            if run is not None:  # ONNX needs onnxruntime
                out[fmt] = 1000 * statistics.median(_step_seconds(lambda: run(image), iters, warmup, torch.device("cpu")))
    return out


def _step_seconds(fn, iters: int, warmup: int, device: torch.device) -> list[float]:
    """Wall time of each of `iters` calls of `fn()` after `warmup` untimed ones (GPU synchronised)."""
    times = []
    for i in range(warmup + iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


class StepTimes(NamedTuple):
    """Seconds per step of one arm over its timed steps."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, times: list[float]) -> "StepTimes":
        return cls(min(times), statistics.median(times), max(times))


SPREAD_LIMIT = 1.5  # an arm's slowest timed step over its fastest beyond this: the median moves with the noise
# Other work on half the cores (1-minute load average per CPU): a CPU step, which uses every core
# through torch's intra-op threads, then waits for it.
LOAD_LIMIT = 0.5


def timing_warnings(baseline: StepTimes, lgd: StepTimes, load: tuple[float, int] | None = None) -> list[str]:
    """Why the LGD / baseline step-time ratio may not be trusted: each a sentence, none when it can.

    Args:
        load: (1-minute load average, CPU count) before the arms ran, for CPU runs; None otherwise.
    """
    warnings = []
    for name, times in (("baseline", baseline), ("LGD", lgd)):
        if times.max > SPREAD_LIMIT * times.min:
            warnings.append(f"{name} step times vary {times.max / times.min:.1f}x (min {times.min:.4f} s, "
                            f"max {times.max:.4f} s): the LGD / baseline ratio is unreliable; "
                            "time more steps (--iters, --warmup) on a quieter machine")
    if baseline.min <= lgd.median <= baseline.max or lgd.min <= baseline.median <= lgd.max:
        warnings.append(f"the arms' step times overlap (baseline {baseline.min:.4f}-{baseline.max:.4f} s, "
                        f"LGD {lgd.min:.4f}-{lgd.max:.4f} s): the difference is within the noise")
    if load is not None and load[0] > LOAD_LIMIT * load[1]:
        warnings.append(f"the machine was busy (load average {load[0]:.1f} on {load[1]} CPUs) before the "
                        "benchmark: other processes compete for the cores, so the times are unreliable")
    return warnings


def _arm_in_child(queue, cfg, lgd, iters, warmup, profile, export, inference=True):
    _compat.fork_data_workers()
    try:
        queue.put(("ok", _measure_arm(cfg, lgd, iters, warmup, profile, export, inference)))
    except BaseException as exc:  # reported by the parent, which would otherwise wait forever
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def run_arm(name: str, cfg, lgd: bool, iters: int, warmup: int, *, profile: bool = False, export: bool = False,
            inference: bool = True) -> dict:
    """One arm (`lgd` or the baseline) measured in a fresh process (so that its peak memory is its own)."""
    return _run_arm(mp.get_context("spawn"), name, cfg, lgd, iters, warmup, profile, export, inference)


def _run_arm(ctx, name: str, *args) -> dict:
    queue = ctx.Queue()
    child = ctx.Process(target=_arm_in_child, args=(queue, *args))
    child.start()
    while True:
        try:
            status, payload = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not child.is_alive():
                status, payload = "error", f"the process exited with code {child.exitcode}"
                break
    child.join()
    if status != "ok":
        raise LGDError(f"benchmark of the {name} arm failed: {payload}")
    return payload


def run_benchmark(cfg, *, iters: int = 20, warmup: int = 5, profile: bool = False, export: bool = False) -> dict:
    """Measure baseline and LGD on `cfg` (each in a fresh process) and compare them.

    Returns:
        Nested dict with at least train.{baseline,lgd}_s_per_iter (the medians) and their _min, _max,
        train.lgd_over_baseline, memory.{baseline,lgd}_peak_mb, params.student, params.lgd_only,
        inference.eager_ms_per_image, and warnings (timing_warnings: sentences, maybe none).
    """
    # Sampled before the arms run: afterwards the load average counts the benchmark's own steps.
    load = cpu_load() if torch.device(cfg.MODEL.DEVICE).type == "cpu" else None
    ctx = mp.get_context("spawn")
    arms = {name: _run_arm(ctx, name, cfg, lgd, iters, warmup, profile, export)
            for name, lgd in (("baseline", False), ("lgd", True))}
    base, lgd = arms["baseline"], arms["lgd"]
    times = {name: StepTimes(arm["s_per_iter_min"], arm["s_per_iter"], arm["s_per_iter_max"])
             for name, arm in arms.items()}
    return {
        "preset": cfg.LGD.PRESET,
        "device": cfg.MODEL.DEVICE,
        "batch": cfg.SOLVER.IMS_PER_BATCH,
        "precision": precision_name(cfg),
        "iters": iters,
        "warmup": warmup,
        "train": {
            "baseline_s_per_iter": base["s_per_iter"], "lgd_s_per_iter": lgd["s_per_iter"],
            "baseline_s_per_iter_min": base["s_per_iter_min"], "baseline_s_per_iter_max": base["s_per_iter_max"],
            "lgd_s_per_iter_min": lgd["s_per_iter_min"], "lgd_s_per_iter_max": lgd["s_per_iter_max"],
            "baseline_images_per_s": base["images_per_s"], "lgd_images_per_s": lgd["images_per_s"],
            "lgd_over_baseline": lgd["s_per_iter"] / base["s_per_iter"],
        },
        "flops": {
            "baseline_train_gflops": base["train_gflops"], "lgd_train_gflops": lgd["train_gflops"],
            "lgd_over_baseline": lgd["train_gflops"] / base["train_gflops"],
        },
        "memory": {
            "baseline_peak_mb": base["peak_mb"], "lgd_peak_mb": lgd["peak_mb"],
            "lgd_over_baseline": lgd["peak_mb"] / base["peak_mb"],
        },
        "params": {"student": lgd["params_student"], "lgd_only": lgd["params_lgd_only"]},
        "inference": {
            "eager_ms_per_image": base["inference_ms_per_image"],
            **{f"{fmt}_ms_per_image": ms for fmt, ms in base.get("export_ms_per_image", {}).items()},
            **{f"{fmt}_over_eager": ms / base["inference_ms_per_image"]
               for fmt, ms in base.get("export_ms_per_image", {}).items()},
        },
        "warnings": timing_warnings(times["baseline"], times["lgd"], load),
        **({"profile": {"lgd": lgd.get("profile", ""), "baseline": base.get("profile", "")}} if profile else {}),
    }

"""`lgd benchmark`: what LGD costs over the plain detector, measured on the same model, data and batch.

Each arm (baseline, LGD) runs in its own fresh process so that its peak memory is its own
(process RSS on CPU, `torch.cuda.max_memory_allocated` on GPU). A step is `lgd train`'s own
(LGDTrainer.run_step: mixed precision per SOLVER.AMP, the metrics it writes, its host syncs).
Times are medians over the timed steps after warm-up; FLOPs come from torch.utils.flop_counter
on one training step.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import queue as queue_module
import resource
import statistics
import sys
import time

from lgd_cli.compat import detectron2 as _compat

import torch
from detectron2.data import build_detection_train_loader
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from torch.utils.flop_counter import FlopCounterMode

from lgd_cli.engine.amp import MixedPrecision
from lgd_cli.engine.optimizers import build_optimizers
from lgd_cli.data.datasets import register_config_datasets
from lgd_cli.modeling.distiller import build_distiller
from lgd_cli.engine.trainer import LGDTrainer
from lgd_cli.errors import LgdError


def _arm_config(cfg, lgd: bool):
    arm = cfg.clone()
    arm.defrost()
    arm.MODEL.DISTILLATOR.ENABLED = lgd
    # Measure the steady state: distillation on, backbone trained (no window skips work).
    arm.MODEL.DISTILLATOR.PRE_NONDISTILL_ITERS = 0
    arm.MODEL.DISTILLATOR.PRE_FREEZE_STUDENT_BACKBONE_ITERS = 0
    arm.freeze()
    return arm


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


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

    with EventStorage(0) as storage:
        trainer.storage = storage
        seconds = _median_seconds(trainer.run_step, iters, warmup, device)
        with FlopCounterMode(display=False) as counter:
            trainer.run_step()
        result = {
            "s_per_iter": seconds,
            "images_per_s": cfg.SOLVER.IMS_PER_BATCH / seconds,
            "peak_mb": _peak_mb(device),
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
            result["inference_ms_per_image"] = 1000 * _median_seconds(
                lambda: model([{"image": image}]), iters, warmup, device)
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
                out[fmt] = 1000 * _median_seconds(lambda: run(image), iters, warmup, torch.device("cpu"))
    return out


def _median_seconds(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `fn()` over `iters` calls after `warmup` untimed ones (GPU synchronised)."""
    times = []
    for i in range(warmup + iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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
        raise LgdError(f"benchmark of the {name} arm failed: {payload}")
    return payload


def run_benchmark(cfg, *, iters: int = 20, warmup: int = 5, profile: bool = False, export: bool = False) -> dict:
    """Measure baseline and LGD on `cfg` (each in a fresh process) and compare them.

    Returns:
        Nested dict with at least train.{baseline,lgd}_s_per_iter, train.lgd_over_baseline,
        memory.{baseline,lgd}_peak_mb, params.student, params.lgd_only, inference.eager_ms_per_image.
    """
    ctx = mp.get_context("spawn")
    arms = {name: _run_arm(ctx, name, cfg, lgd, iters, warmup, profile, export)
            for name, lgd in (("baseline", False), ("lgd", True))}
    base, lgd = arms["baseline"], arms["lgd"]
    return {
        "preset": cfg.LGD.PRESET,
        "device": cfg.MODEL.DEVICE,
        "batch": cfg.SOLVER.IMS_PER_BATCH,
        "precision": precision_name(cfg),
        "iters": iters,
        "warmup": warmup,
        "train": {
            "baseline_s_per_iter": base["s_per_iter"], "lgd_s_per_iter": lgd["s_per_iter"],
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
        **({"profile": {"lgd": lgd.get("profile", ""), "baseline": base.get("profile", "")}} if profile else {}),
    }

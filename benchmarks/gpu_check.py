"""One prepared GPU check (benchmarks/gpu_check.sh runs it): run on a machine with one CUDA GPU after `make setup`.

1. the test suite's CUDA-marked tests (tests/test_cuda.py: training steps in fp32/bf16/fp16, resume, export);
2. RetinaNet R-50 FPN (retinanet-r50-2x's model), 2 images of 800 px, synthetic data, no weights: baseline
   and LGD, fp32 and bf16, ITERS timed steps each (s/iter, images/s, peak memory, LGD / baseline);
3. Swin-T RetinaNet LGD (retinanet-swint-3x's model), 2 images of 800 px, with and without
   MODEL.SWINT.USE_CHECKPOINT (peak memory);
4. a 1-process NCCL launch through lgd's launcher: all-reduces where the trainer and hooks do them, a DDP step.

Writes DIR/gpu-check.json and DIR/gpu-check.md (the same numbers as a table). Each measurement runs in its
own process (`lgd benchmark`'s arms), so its peak memory is its own. `--dry-run` runs every part small on
the CPU (gloo instead of NCCL, no tests): what tests/test_gpu_check.py exercises.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What the models run on: the embedded synthetic shapes resized to 800 px (the paper's largest
# training scale), 2 images, no pretrained weights (nothing to download).
R50 = ["LGD.DATA.SOURCE=synthetic", "MODEL.WEIGHTS=", "INPUT.MIN_SIZE_TRAIN=(800,)", "INPUT.MAX_SIZE_TRAIN=1333",
       "DATALOADER.NUM_WORKERS=2"]
BF16 = ["SOLVER.AMP.ENABLED=True", "SOLVER.AMP.DTYPE=bfloat16"]
# --dry-run: the same parts, small enough for a CPU in seconds.
DRY = ["LGD.DATA.SOURCE=synthetic", "MODEL.WEIGHTS=", "INPUT.MIN_SIZE_TRAIN=(128,)", "INPUT.MAX_SIZE_TRAIN=128",
       "DATALOADER.NUM_WORKERS=0", "MODEL.FPN.OUT_CHANNELS=32", "MODEL.RETINANET.NORM="]
DRY_SWIN = ["MODEL.SWINT.EMBED_DIM=16", "MODEL.SWINT.DEPTHS=[1,1,2,1]", "MODEL.SWINT.NUM_HEADS=[1,2,2,4]",
            "MODEL.SWINT.WINDOW_SIZE=3"]


def _config(preset: str, pairs: list[str], device: str):
    from lgd_cli.config.build import build_config

    return build_config(preset, pairs, device=device)


def run_tests(timeout: int) -> dict:
    """The suite's CUDA-marked tests, in a subprocess; their summary line and exit status."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:randomly", "tests"],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""), -1
        out += f"\n(timed out after {timeout} s)"
    summary = next((line for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|skipped|error)", line)),
                   out.strip().splitlines()[-1] if out.strip() else "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    failures = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"rc": rc, "summary": summary.strip("= "), "counts": counts, "failures": failures[:20],
            "seconds": time.perf_counter() - start, "ok": rc == 0 and counts.get("passed", 0) > 0}


def run_retinanet(device: str, iters: int, warmup: int, dry: bool) -> dict:
    """Baseline and LGD of retinanet-r50-2x's model (demo's small RetinaNet with --dry-run), fp32 and bf16."""
    from lgd_cli.engine.benchmark import run_arm

    preset, pairs = ("demo", DRY) if dry else ("retinanet-r50-2x", R50)
    rows = {}
    for precision, extra in (("fp32", []), ("bf16", BF16)):
        cfg = _config(preset, pairs + extra + ["SOLVER.IMS_PER_BATCH=2"], device)
        for arm, lgd in (("baseline", False), ("lgd", True)):
            r = run_arm(arm, cfg, lgd, iters, warmup, inference=False)
            rows[f"{arm}_{precision}"] = {k: r[k] for k in ("s_per_iter", "images_per_s", "peak_mb", "train_gflops")}
    for precision in ("fp32", "bf16"):
        rows[f"lgd_over_baseline_{precision}"] = rows[f"lgd_{precision}"]["s_per_iter"] / rows[f"baseline_{precision}"]["s_per_iter"]
    # The target: LGD in bf16 at most 1.6x the fp32 baseline's step.
    rows["lgd_bf16_over_baseline_fp32"] = rows["lgd_bf16"]["s_per_iter"] / rows["baseline_fp32"]["s_per_iter"]
    return {"preset": preset, "images": 2, "size": 128 if dry else 800, "iters": iters, "warmup": warmup, **rows}


def run_swin(device: str, iters: int, warmup: int, dry: bool) -> dict:
    """LGD on retinanet-swint-3x's model, with and without activation checkpointing: peak memory."""
    from lgd_cli.engine.benchmark import run_arm

    pairs = (DRY + DRY_SWIN) if dry else R50
    out = {}
    for use in (False, True):
        cfg = _config("retinanet-swint-3x", pairs + ["SOLVER.IMS_PER_BATCH=2", f"MODEL.SWINT.USE_CHECKPOINT={use}"], device)
        r = run_arm("lgd", cfg, True, iters, warmup, inference=False)
        out["checkpointed" if use else "plain"] = {k: r[k] for k in ("s_per_iter", "images_per_s", "peak_mb")}
    out["peak_ratio"] = out["checkpointed"]["peak_mb"] / out["plain"]["peak_mb"]
    return {"preset": "retinanet-swint-3x", "images": 2, "size": 128 if dry else 800, "iters": iters, **out}


def _launch_probe(cfg, output: str, report: str) -> None:
    """Inside the launched process group: the collectives lgd makes, a DDP step, a short `lgd train` run."""
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage

    from lgd_cli.config.build import SavedConfig, build_config
    from lgd_cli.engine.benchmark import _arm_config
    from lgd_cli.data.datasets import register_config_datasets
    from lgd_cli.data.loader import build_train_loader
    from lgd_cli.engine import train as engine_train
    from lgd_cli.engine.amp import MixedPrecision
    from lgd_cli.engine.hooks import collective_device
    from lgd_cli.engine.optimizers import build_optimizers
    from lgd_cli.engine.trainer import LGDTrainer
    from lgd_cli.modeling.distiller import build_distiller

    result = {"backend": dist.get_backend(), "world_size": comm.get_world_size(), "rank": comm.get_rank()}
    # GracefulStopHook's and the trainer's all-reduces, on the device the backend reduces on.
    flag = torch.tensor([3], dtype=torch.int64, device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    result["all_reduce"] = int(flag.item()) == 3
    comm.synchronize()
    result["all_gather"] = comm.all_gather({"rank": comm.get_rank()}) == [{"rank": 0}]
    # One DDP-wrapped LGD step, as `lgd train --gpus N` wraps it.
    cfg = _arm_config(cfg, True)
    register_config_datasets(cfg, splits=("train",))
    model = build_distiller(cfg)
    optimizers, _ = build_optimizers(cfg, model)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[comm.get_local_rank()] if cfg.MODEL.DEVICE.startswith("cuda") else None,
        broadcast_buffers=False)
    trainer = LGDTrainer(ddp, build_train_loader(cfg), optimizers, model.frozen_backbone_parameters(),
                         amp=MixedPrecision.from_config(cfg))
    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer.run_step()
        trainer.run_step()
    result["ddp_steps"] = 2
    # A short training run through lgd's worker, as the launcher calls it (its schedule scaled to
    # the 4 iterations by build_config, as `lgd train --iters 4` scales it).
    train_cfg = build_config(SavedConfig.of(cfg), ["SOLVER.MAX_ITER=4", "SOLVER.CHECKPOINT_PERIOD=2", "TEST.EVAL_PERIOD=0"],
                             device=cfg.MODEL.DEVICE)
    Path(output).mkdir(parents=True, exist_ok=True)
    engine_train._train_worker(train_cfg, output, False)
    result["train_summary"] = json.loads((Path(output) / "summary.json").read_text())
    Path(report).write_text(json.dumps(result, default=str))


def run_launch(device: str, dry: bool) -> dict:
    """A 1-process launch through lgd's launcher into a real process group (NCCL on CUDA, gloo with --dry-run)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from lgd_cli.engine import launch as launch_mod

    use_cuda = device.startswith("cuda")
    cfg = _config("demo", DRY + ["SOLVER.IMS_PER_BATCH=2"], device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lgd-gpu-check-") as tmp:
        report = Path(tmp) / "report.json"
        try:
            # `launch` calls a 1-process job directly; its process-group worker is what N GPUs run,
            # meeting on the store a machine's launcher hosts (port 0: a free one).
            store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
            mp.start_processes(launch_mod._distributed_worker, nprocs=1, start_method="spawn",
                               args=(_launch_probe, "127.0.0.1", store.port, 1, 1, 0, use_cuda, tmp,
                                     (cfg, str(Path(tmp) / "run"), str(report))))
            result = json.loads(report.read_text())
            result["ok"] = bool(result["all_reduce"] and result["all_gather"])
        except Exception as exc:  # reported, not raised: the other parts' numbers still count
            result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"}
    result["expected_backend"] = "nccl" if use_cuda else "gloo"
    result["ok"] = result["ok"] and result.get("backend") == result["expected_backend"]
    result["seconds"] = time.perf_counter() - start
    return result


def environment() -> dict:
    import torch

    import lgd_cli

    env = {"python": platform.python_version(), "torch": torch.__version__, "lgd": lgd_cli.__version__,
           "cuda": torch.version.cuda, "gpu": None}
    try:  # which code the numbers are of
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   bf16_supported=torch.cuda.is_bf16_supported())
    return env


def _mb(x: float) -> str:
    return f"{x:,.0f} MB" if x >= 10 else f"{x:.1f} MB"


def render_markdown(report: dict) -> str:
    """The report as the readable table (Markdown) printed at the end and written beside the JSON."""
    env = report["environment"]
    lines = [f"# lgd GPU check ({report['mode']})", "",
             f"{env.get('gpu') or 'no GPU'}, torch {env['torch']} (CUDA {env['cuda']}), lgd {env['lgd']}; "
             f"{report['seconds']:.0f} s in all", ""]
    tests = report.get("tests")
    if tests:
        lines += [f"**CUDA tests**: {'ok' if tests['ok'] else 'FAILED'}: {tests['summary']}"]
        lines += [f"- {f}" for f in tests["failures"]]
        lines.append("")
    r = report.get("retinanet")
    if r:
        lines += [f"**RetinaNet** ({r['preset']}'s model, {r['images']} images of {r['size']} px, synthetic data, "
                  f"median of {r['iters']} steps)", "",
                  "| arm | precision | s/iter | images/s | peak memory | LGD / baseline |", "|---|---|---|---|---|---|"]
        for precision in ("fp32", "bf16"):
            for arm in ("baseline", "lgd"):
                row = r[f"{arm}_{precision}"]
                ratio = f"{r[f'lgd_over_baseline_{precision}']:.2f}x" if arm == "lgd" else ""
                lines.append(f"| {arm} | {precision} | {row['s_per_iter']:.4f} | {row['images_per_s']:.1f} | "
                             f"{_mb(row['peak_mb'])} | {ratio} |")
        lines += ["", f"LGD bf16 / baseline fp32: {r['lgd_bf16_over_baseline_fp32']:.2f}x (target: at most 1.6x)", ""]
    s = report.get("swin")
    if s:
        lines += [f"**Swin-T RetinaNet LGD** ({s['images']} images of {s['size']} px, median of {s['iters']} steps)", "",
                  "| activation checkpointing | s/iter | peak memory |", "|---|---|---|"]
        for key, name in (("plain", "off"), ("checkpointed", "on (MODEL.SWINT.USE_CHECKPOINT=True)")):
            lines.append(f"| {name} | {s[key]['s_per_iter']:.4f} | {_mb(s[key]['peak_mb'])} |")
        lines += ["", f"peak memory with / without: {s['peak_ratio']:.2f} (target: LGD within 10 GiB)", ""]
    launch = report.get("launch")
    if launch:
        detail = (f"backend {launch.get('backend')}, all-reduce {launch.get('all_reduce')}, "
                  f"all-gather {launch.get('all_gather')}, DDP steps {launch.get('ddp_steps')}, "
                  f"train {launch.get('train_summary', {}).get('iterations')} iterations"
                  if "error" not in launch else launch["error"].splitlines()[-1])
        lines += [f"**1-process launch** ({launch['expected_backend']}): {'ok' if launch['ok'] else 'FAILED'}: {detail}", ""]
    for part, error in report.get("errors", {}).items():
        lines.append(f"**{part}** FAILED: {error}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "output" / "gpu-check", help="report folder")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per arm (default 200; 2 with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="every part small, on the CPU (gloo), tests skipped")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the CUDA-marked tests")
    parser.add_argument("--parts", default="tests,retinanet,swin,launch", help="comma-separated parts to run")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if not args.dry_run and not device.startswith("cuda"):
        print("gpu_check: no CUDA device visible; --dry-run runs the parts small on the CPU", file=sys.stderr)
        return 2
    iters = args.iters or (2 if args.dry_run else 200)
    warmup = 1 if args.dry_run else 10
    parts = [p for p in args.parts.split(",") if p]
    if args.dry_run or args.skip_tests:
        parts = [p for p in parts if p != "tests"]
    start = time.perf_counter()
    report = {"mode": "dry run, CPU" if args.dry_run else f"GPU, {device}", "device": device,
              "environment": environment(), "errors": {}}
    jobs = {"tests": lambda: run_tests(timeout=240), "retinanet": lambda: run_retinanet(device, iters, warmup, args.dry_run),
            "swin": lambda: run_swin(device, max(iters // 10, 2), warmup, args.dry_run),
            "launch": lambda: run_launch(device, args.dry_run)}
    for part in parts:
        print(f"gpu_check: {part} ...", file=sys.stderr, flush=True)
        try:
            report[part] = jobs[part]()
        except Exception as exc:  # one broken part must not cost the others' numbers
            report["errors"][part] = f"{type(exc).__name__}: {exc}"
    report["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    text = render_markdown(report)
    (args.out / "gpu-check.md").write_text(text)
    print(text)
    print(f"written to {args.out / 'gpu-check.json'} and {args.out / 'gpu-check.md'}")
    failed = report["errors"] or any(not report[p].get("ok", True) for p in ("tests", "launch") if p in report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

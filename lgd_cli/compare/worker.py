"""One run of a comparison, in its own process: train (or resume) it, evaluate it, write result.json.

`python -m lgd_cli.compare.worker RUN_DIR` reads RUN_DIR/run.json (preset, overrides, device,
seed, arm), written by runner.py. A crash here ends this process only, not the comparison.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

RUN_SPEC = "run.json"
RESULT = "result.json"
TRAIN_COST = "train-cost.json"
FINAL_EVAL = "final-eval"


def read_metrics(path: Path) -> list[dict]:
    """metrics.json rows (one JSON object per line), the last row per iteration winning.

    A resumed run appends the iterations after its checkpoint again, and a killed one may end
    in a cut line: both are handled here.
    """
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "iteration" in row:
            rows.setdefault(row["iteration"], {}).update(row)
    return [rows[k] for k in sorted(rows)]


def eval_rows(rows: list[dict], max_iter: int, who: str = "student", task: str = "bbox") -> dict[int, dict]:
    """{iterations done: {metric: value}} of the periodic evaluations in metrics.json rows.

    detectron2 logs a periodic evaluation after 0-based iteration i at i, and the final one
    (run in after_train) at MAX_ITER: both mean min(i + 1, MAX_ITER) iterations done.
    """
    prefix = f"{who}/{task}/"
    out = {}
    for row in rows:
        metrics = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}
        if metrics:
            out[min(row["iteration"] + 1, max_iter)] = metrics
    return out


def seconds_per_iter(rows: list[dict]) -> float | None:
    """Median training step time: the `time` column (each a 20-step median), evaluations excluded."""
    times = sorted(r["time"] for r in rows if isinstance(r.get("time"), (int, float)))
    if not times:
        return None
    mid = len(times) // 2
    return times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: the CUDA allocator's on GPU, resident set size on CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _final_from_log(rows: list[dict], max_iter: int, tasks: tuple[str, ...], teacher: bool) -> dict | None:
    """The evaluation the training's EvalHook ran after the last iteration, if it did."""
    results = {}
    for who in ("student", "teacher") if teacher else ("student",):
        by_task = {}
        for task in tasks:
            metrics = eval_rows(rows, max_iter, who, task).get(max_iter)
            if metrics is None:
                return None
            by_task[task] = metrics
        results[who] = by_task
    return results


def run(run_dir: Path) -> dict:
    """Train (resuming what is there) and evaluate the run in `run_dir`; write and return result.json."""
    from lgd_cli.config.build import build_config
    from lgd_cli.engine.evaluate import evaluate_checkpoint
    from lgd_cli.engine.train import train
    from lgd_cli.files import atomic_write_bytes

    def write_json(path: Path, data: dict) -> None:
        atomic_write_bytes(path, lambda f: f.write(json.dumps(data, indent=1).encode()))

    spec = json.loads((run_dir / RUN_SPEC).read_text())
    cfg = build_config(spec["preset"], spec["overrides"], device=spec["device"])
    final = run_dir / "model_final.pth"
    if not final.exists():
        start = time.perf_counter()
        train(cfg, run_dir, resume=True)  # a fresh start when the folder holds no checkpoint yet
        write_json(run_dir / TRAIN_COST, {"peak_mb": peak_memory_mb(cfg.MODEL.DEVICE),
                                          "wall_s": time.perf_counter() - start})
    cost = json.loads((run_dir / TRAIN_COST).read_text()) if (run_dir / TRAIN_COST).is_file() else {}
    lgd = bool(cfg.MODEL.DISTILLATOR.ENABLED)
    with_teacher = lgd and bool(cfg.MODEL.DISTILLATOR.EVAL_TEACHER)
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    rows = read_metrics(run_dir / "metrics.json")
    evaluated = _final_from_log(rows, cfg.SOLVER.MAX_ITER, tasks, with_teacher)
    if evaluated is None:
        evaluated = evaluate_checkpoint(final, eval_teacher=with_teacher, output=run_dir / FINAL_EVAL,
                                        device=spec["device"])
    result = {
        "seed": spec["seed"], "arm": spec["arm"], "iterations": cfg.SOLVER.MAX_ITER,
        "student": evaluated["student"],
        **({"teacher": evaluated["teacher"]} if "teacher" in evaluated else {}),
        "s_per_iter": seconds_per_iter(rows),
        "peak_mb": cost.get("peak_mb"),
        "device": cfg.MODEL.DEVICE,
    }
    result = _no_nan(result)
    write_json(run_dir / RESULT, result)
    return result


def _no_nan(value):
    """COCOeval reports NaN where there is nothing to score (e.g. no large objects); JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def main(argv: list[str]) -> int:
    import os

    from lgd_cli.console import print_error
    from lgd_cli.errors import LgdError

    try:
        run(Path(argv[0]))
    except LgdError as exc:
        if os.environ.get("LGD_DEBUG") == "1":
            raise
        print_error(exc.message, exc.hint)
        return exc.exit_code
    except KeyboardInterrupt:
        print_error("interrupted", "re-run the comparison with --resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One run of a comparison, in its own process: train (or resume) it, evaluate it, write result.json.

`python -m lgd_cli.compare.worker RUN_DIR` reads RUN_DIR/run.json (preset, overrides, device,
seed, arm), written by runner.py. A crash here ends this process only, not the comparison.
"""
from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

from lgd_cli.files import read_metrics

RUN_SPEC = "run.json"
RESULT = "result.json"
TRAIN_COST = "train-cost.json"
FINAL_EVAL = "final-eval"


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
    times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float))]
    return statistics.median(times) if times else None


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
    from lgd_cli.engine.resources import peak_memory_mb
    from lgd_cli.engine.train import train
    from lgd_cli.files import atomic_write_json, finite_or_null

    spec = json.loads((run_dir / RUN_SPEC).read_text())
    cfg = build_config(spec["preset"], spec["overrides"], device=spec["device"])
    final = run_dir / "model_final.pth"
    if not final.exists():
        start = time.perf_counter()
        train(cfg, run_dir, resume=True)  # a fresh start when the folder holds no checkpoint yet
        atomic_write_json(run_dir / TRAIN_COST, {"peak_mb": peak_memory_mb(cfg.MODEL.DEVICE),
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
    result = finite_or_null(result)  # the returned result says what result.json says
    atomic_write_json(run_dir / RESULT, result)
    return result


def main(argv: list[str]) -> int:
    from lgd_cli.errors import user_error

    # The run's banner and periodic lines also go to compare.log (this process's stdout), plain.
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="[%(asctime)s] %(message)s",
                        datefmt="%m/%d %H:%M:%S")
    try:
        run(Path(argv[0]))
    except (Exception, KeyboardInterrupt) as exc:
        error = user_error(exc, interrupted_hint="re-run the comparison with --resume")
        if error is None:
            raise
        # Plain lines into compare.log: the runner reports the last "error:" line of a failed run.
        print(f"error: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

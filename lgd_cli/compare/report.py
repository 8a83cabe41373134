"""The comparison's numbers: per run, per arm (mean ± std), the paired difference LGD − baseline with
its 95% interval, the verdict and the training cost; as a dict (compare.json), markdown and rich tables.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from lgd_cli.compare.runner import ARMS, CompareSettings, Run, RunOutcome
from lgd_cli.compare.stats import METHOD_NAMES, mean_std, paired_difference, verdict
from lgd_cli.compare.worker import eval_rows

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
ARM_NAMES = {"baseline": "baseline (--no-lgd)", "lgd": "LGD"}
TEACHER_NOTE = ("the teacher reads the ground-truth boxes at test time: its AP is shown as the upper bound "
                "of what distillation can pass on, never as a result of a deployable model")
NO_VERDICT = ("no verdict: no seed has both runs finished with a bbox AP (COCO reports a model without "
              "any detection as NaN)")
TIMING_NOTE = ("s/iter is the median training step time in metrics.json; it is inflated when other processes "
               "(or other runs, with --jobs > 1) share the machine")


def _stat(values: list[float]) -> dict | None:
    if not values:
        return None
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values)}


def _value(result: dict, who: str, task: str, metric: str) -> float | None:
    value = result.get(who, {}).get(task, {}).get(metric)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _curve(rows: list[dict], max_iter: int, who: str, task: str) -> dict:
    points = eval_rows(rows, max_iter, who, task)
    return {"iterations": sorted(points), "AP": [_value({who: {task: points[i]}}, who, task, "AP") for i in sorted(points)]}


def build_report(settings: CompareSettings, results: dict[Run, dict], outcomes: list[RunOutcome]) -> dict:
    """Everything compare.json holds, from the finished runs' result.json and metrics.json rows."""
    tasks = [t for t in ("bbox", "segm") if any(t in r.get("student", {}) for r in results.values())]
    runs = []
    for run, res in sorted(results.items(), key=lambda kv: (kv[0].seed, kv[0].arm)):
        entry = {"run": run.name, "seed": run.seed, "arm": run.arm, "folder": res["folder"],
                 "student": {t: {m: _value(res, "student", t, m) for m in METRICS} for t in tasks},
                 "s_per_iter": res.get("s_per_iter"), "peak_mb": res.get("peak_mb"),
                 "curve": {t: _curve(res["rows"], settings.iters, "student", t) for t in tasks}}
        if "teacher" in res:
            entry["teacher"] = {t: {m: _value(res, "teacher", t, m) for m in METRICS} for t in tasks}
            entry["teacher_curve"] = {t: _curve(res["rows"], settings.iters, "teacher", t) for t in tasks}
        runs.append(entry)
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}

    def values(entries, who, task, metric):
        return [e[who][task][metric] for e in entries if who in e and e[who][task][metric] is not None]

    arms = {arm: {t: {m: _stat(values(by_arm[arm], "student", t, m)) for m in METRICS} for t in tasks}
            for arm in ARMS}
    arms["teacher"] = {t: {m: _stat(values(by_arm["lgd"], "teacher", t, m)) for m in METRICS} for t in tasks}
    paired_seeds = sorted({r["seed"] for r in by_arm["baseline"]} & {r["seed"] for r in by_arm["lgd"]})
    seed_of = {(r["seed"], r["arm"]): r for r in runs}
    difference, headline = {}, None
    for t in tasks:
        difference[t] = {}
        for m in METRICS:
            pairs = [(seed_of[s, "baseline"]["student"][t][m], seed_of[s, "lgd"]["student"][t][m]) for s in paired_seeds]
            pairs = [(b, g) for b, g in pairs if b is not None and g is not None]
            if not pairs:
                continue
            diff = paired_difference([b for b, _ in pairs], [g for _, g in pairs], method=settings.interval)
            difference[t][m] = {"n": diff.n, "mean": diff.mean, "std": diff.std, "low": diff.low, "high": diff.high}
            if (t, m) == ("bbox", "AP"):
                headline = verdict(diff, "AP")

    cost = {arm: {k: _stat([r[k] for r in by_arm[arm] if r[k] is not None]) for k in ("s_per_iter", "peak_mb")}
            for arm in ARMS}
    cost["lgd_over_baseline"] = {
        k: (cost["lgd"][k]["mean"] / cost["baseline"][k]["mean"]) if cost["lgd"][k] and cost["baseline"][k] else None
        for k in ("s_per_iter", "peak_mb")}
    notes = {"teacher": TEACHER_NOTE, "timing": TIMING_NOTE}
    teacher_ap, student_ap = arms["teacher"].get("bbox", {}).get("AP"), arms["lgd"].get("bbox", {}).get("AP")
    if teacher_ap and student_ap and teacher_ap["mean"] < student_ap["mean"]:
        notes["weak_teacher"] = (f"the teacher ({teacher_ap['mean']:.2f} AP) scores below the LGD student "
                                 f"({student_ap['mean']:.2f} AP): on this recipe there is little for it to pass on")
    failed = [{"run": o.run.name, "exit_code": o.exit_code, "error": o.error} for o in outcomes
              if o.run not in results]
    return {
        "settings": settings.to_json(),
        "complete": not failed and len(results) == 2 * settings.seeds,
        "tasks": tasks,
        "paired_seeds": paired_seeds,
        "interval": {"method": settings.interval, "name": METHOD_NAMES[settings.interval], "confidence": 0.95},
        "verdict": headline,
        "verdict_metric": "bbox AP of the student (LGD − baseline, paired by seed)",
        "arms": arms,
        "difference": difference,
        "cost": cost,
        "runs": runs,
        "reused": [o.run.name for o in outcomes if o.reused],
        "failed": failed,
        "notes": notes,
    }


def _pm(stat: dict | None, digits: int = 2) -> str:
    if not stat:
        return "n/a"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _diff(d: dict | None) -> str:
    if not d:
        return "n/a"
    if d["low"] is None:
        return f"{d['mean']:+.2f} (1 seed)"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def summary_rows(report: dict) -> list[list[str]]:
    """Per metric: baseline mean ± std, LGD mean ± std, LGD − baseline [95% interval]; then the teacher.

    A metric no run could score (e.g. APl on a set without large objects) is left out.
    """
    rows = []
    for t in report["tasks"]:
        for m in METRICS:
            base, lgd = report["arms"]["baseline"][t][m], report["arms"]["lgd"][t][m]
            if base or lgd:
                rows.append([f"{t} {m}", _pm(base), _pm(lgd), _diff(report["difference"][t].get(m))])
    for t in report["tasks"]:
        rows.append([f"teacher {t} AP (upper bound)", "-", _pm(report["arms"]["teacher"][t]["AP"]), "-"])
    return rows


def run_columns(report: dict, metrics: tuple[str, ...] = METRICS) -> list[str]:
    t0 = report["tasks"][0] if report["tasks"] else "bbox"
    return (["run", *metrics] + (["segm AP"] if "segm" in report["tasks"] else [])
            + [f"teacher {t0} AP", "s/iter", "peak MB"])


def run_rows(report: dict, metrics: tuple[str, ...] = METRICS) -> list[list[str]]:
    """One row per run (student metrics of the first task, teacher AP, cost), then the failed runs."""
    t0 = report["tasks"][0] if report["tasks"] else "bbox"
    width = len(run_columns(report, metrics))
    rows = []
    for r in report["runs"]:
        s = r["student"].get(t0, {})
        rows.append([r["run"], *[_num(s.get(m), ".2f") for m in metrics],
                     *([_num(r["student"]["segm"]["AP"], ".2f")] if "segm" in r["student"] else []),
                     _num(r["teacher"][t0]["AP"], ".2f") if "teacher" in r else "-",
                     _num(r["s_per_iter"], ".3f"), _num(r["peak_mb"], ".0f")])
    for f in report["failed"]:
        rows.append([f["run"], f"failed (exit {f['exit_code']}): {f['error']}"] + [""] * (width - 2))
    return rows


def cost_rows(report: dict) -> list[list[str]]:
    c = report["cost"]
    ratio = c["lgd_over_baseline"]
    return [["train s/iter", _pm(c["baseline"]["s_per_iter"], 3), _pm(c["lgd"]["s_per_iter"], 3),
             _num(ratio["s_per_iter"], ".2f") + "x" if ratio["s_per_iter"] else "n/a"],
            ["peak memory MB", _pm(c["baseline"]["peak_mb"], 0), _pm(c["lgd"]["peak_mb"], 0),
             _num(ratio["peak_mb"], ".2f") + "x" if ratio["peak_mb"] else "n/a"]]


def report_title(report: dict) -> str:
    s = report["settings"]
    return (f"lgd compare: {Path(s['preset']).stem}, {s['iters']} iterations, seeds 0..{s['seeds'] - 1}, "
            f"{len(report['paired_seeds'])} paired")


def interval_line(report: dict) -> str:
    return (f"interval: 95% {report['interval']['name']} over {len(report['paired_seeds'])} paired seeds "
            f"(seed s of both arms: same data order, augmentation and initial student weights)")


def markdown(report: dict, plots: list[str], plots_skipped: str | None) -> str:
    """compare.md: the verdict, the tables, the plots, and what the numbers mean."""

    def md_table(columns, rows):
        lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
        return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])

    s = report["settings"]
    parts = [f"# {report_title(report)}", ""]
    parts += [f"**{report['verdict'] or NO_VERDICT}** "
              f"({report['verdict_metric']}).", "", interval_line(report) + ".", ""]
    if not report["complete"]:
        parts += ["**Incomplete**: " + ", ".join(f["run"] for f in report["failed"])
                  + " failed (see compare.log in their folders); re-run with `--resume`.", ""]
    parts += ["## Per arm (mean ± std over seeds)", "",
              md_table(["metric", ARM_NAMES["baseline"], ARM_NAMES["lgd"], "LGD − baseline [95% interval]"],
                       summary_rows(report)), "",
              *[f"Note: {text}." for key, text in report["notes"].items() if key != "timing"], ""]
    parts += ["## Training cost", "", md_table(["", ARM_NAMES["baseline"], ARM_NAMES["lgd"], "LGD / baseline"],
                                               cost_rows(report)), "", TIMING_NOTE + ".", ""]
    parts += ["## Per run", "", md_table(run_columns(report), run_rows(report)), ""]
    if plots:
        parts += ["## Curves", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    elif plots_skipped:
        parts += [f"Plots skipped: {plots_skipped}.", ""]
    parts += ["## Settings", "", "```json", json.dumps(s, indent=1), "```", ""]
    return "\n".join(parts)

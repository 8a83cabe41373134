"""The PNGs (matplotlib, the optional `plot` extra): a comparison's AP and loss curves, and `lgd plot`'s
curves of any run folders.

Without matplotlib a comparison draws nothing and its report says so (every number is still in
compare.json); `lgd plot` fails with the install hint.
"""
from __future__ import annotations

from pathlib import Path

import yaml

ARM_COLORS = {"baseline": "tab:blue", "lgd": "tab:orange", "teacher": "tab:green"}
ARM_LABELS = {"baseline": "baseline", "lgd": "LGD"}


def distillation_window(config_yaml: Path) -> tuple[int, int, int]:
    """(first, last, max_iter): distillation is on for iterations first..last of a run's config.yaml."""
    cfg = yaml.safe_load(Path(config_yaml).read_text())
    d = cfg["MODEL"]["DISTILLATOR"]
    max_iter = int(cfg["SOLVER"]["MAX_ITER"])
    return int(d["PRE_NONDISTILL_ITERS"]), max_iter - int(d["POST_NONDISTILL_ITERS"]), max_iter


def _mean_band(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max over runs at the x where every run has a value."""
    if not series:
        return [], [], [], []
    xs = sorted(set.intersection(*(set(s) for s in series)))
    cols = [[s[x] for s in series] for x in xs]
    return xs, [sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def _ap_series(runs: list[dict], key: str, task: str) -> list[dict[int, float]]:
    out = []
    for r in runs:
        curve = r.get(key, {}).get(task)
        if curve:
            points = {x: y for x, y in zip(curve["iterations"], curve["AP"]) if y is not None}
            if points:
                out.append(points)
    return out


def _loss_series(rows: list[dict], keep) -> dict[str, dict[int, float]]:
    terms: dict[str, dict[int, float]] = {}
    for row in rows:
        for k, v in row.items():
            if k.startswith("loss_") and keep(k) and isinstance(v, (int, float)):
                terms.setdefault(k, {})[row["iteration"] + 1] = v
    return terms


def _shade_window(ax, window) -> None:
    if window is not None:
        first, last, _ = window
        ax.axvspan(first, last, color="0.92", zorder=0, label="distillation on")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_runs(folders: list[Path], output: Path) -> Path:
    """`lgd plot`: loss terms and AP against iteration of training runs, overlaid, labelled by folder name.

    Each folder's metrics.json (written by `lgd train`) gives the curves; one panel per loss term
    (the median of the last 20 iterations, as logged) and one for the student's bbox AP of each
    evaluation (the teacher's dashed where it was evaluated).

    Raises:
        LGDError: matplotlib is missing, or a folder has no metrics.json.
    """
    from lgd_cli.compare.worker import eval_rows
    from lgd_cli.errors import DataError, LGDError
    from lgd_cli.files import read_metrics

    try:
        plt = _pyplot()
    except ImportError:
        raise LGDError("lgd plot needs matplotlib, which is not installed", hint="pip install 'lgd[plot]'") from None
    runs = []
    for folder in map(Path, folders):
        if not (folder / "metrics.json").is_file():
            raise DataError(f"{folder} has no metrics.json: not a run folder of `lgd train`",
                            hint="give the --output folder of a training run, e.g. output/demo")
        config = folder / "config.yaml"
        max_iter = distillation_window(config)[2] if config.is_file() else 10**12
        runs.append((folder.resolve().name or str(folder), read_metrics(folder / "metrics.json"), max_iter))
    terms = sorted({k for _, rows, _ in runs for row in rows for k in row if k.startswith("loss_")})
    panels = ["total_loss", *terms, "AP"]
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        for i, (name, rows, max_iter) in enumerate(runs):
            color = colors[i % len(colors)]
            if panel == "AP":
                for who, style in (("student", "-"), ("teacher", "--")):
                    points = sorted((x, m["AP"]) for x, m in eval_rows(rows, max_iter, who).items()
                                    if isinstance(m.get("AP"), (int, float)))
                    if points:
                        ax.plot(*zip(*points), linestyle=style, marker="o", color=color,
                                label=name if who == "student" else f"{name} teacher")
            else:
                points = [(row["iteration"] + 1, row[panel]) for row in rows
                          if isinstance(row.get(panel), (int, float))]
                if points:
                    ax.plot(*zip(*points), color=color, label=name)
        ax.set_title("student bbox AP (teacher dashed)" if panel == "AP" else panel, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=80)
    plt.close(fig)
    return output


def write_plots(report: dict, results: dict, output: Path) -> tuple[list[str], str | None]:
    """Write ap.png and losses.png into `output`.

    Args:
        report: build_report's dict (curves per run); results: load_results' {Run: result + rows}.

    Returns:
        (file names written, why plots were skipped or None).
    """
    try:
        plt = _pyplot()
    except ImportError:
        return [], "matplotlib is not installed (pip install 'lgd[plot]')"
    if not report["runs"]:
        return [], "no run finished"
    lgd_runs = [r for r in report["runs"] if r["arm"] == "lgd"]
    window = distillation_window(Path(lgd_runs[0]["folder"]) / "config.yaml") if lgd_runs else None
    written = []

    # 1. AP vs iteration: mean over seeds, band from the lowest to the highest seed, the teacher dashed.
    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        _shade_window(ax, window)
        for arm in ("baseline", "lgd"):
            xs, mean, low, high = _mean_band(_ap_series([r for r in report["runs"] if r["arm"] == arm], "curve", task))
            if xs:
                ax.plot(xs, mean, marker="o", color=ARM_COLORS[arm], label=f"{ARM_LABELS[arm]} (mean of seeds)")
                ax.fill_between(xs, low, high, color=ARM_COLORS[arm], alpha=0.2)
        xs, mean, low, high = _mean_band(_ap_series(lgd_runs, "teacher_curve", task))
        if xs:
            ax.plot(xs, mean, linestyle="--", marker=".", color=ARM_COLORS["teacher"],
                    label="LGD teacher (reads ground truth: upper bound)")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{task} AP")
        ax.set_title(f"{task} AP on the validation set (bands: min-max over seeds)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output / "ap.png", dpi=110)
    plt.close(fig)
    written.append("ap.png")

    # 2. Losses: student terms (both arms), teacher `.tea` terms and loss_distill (LGD), mean over seeds.
    panels = [("student detection losses", lambda k: not k.endswith(".tea") and k != "loss_distill",
               ("baseline", "lgd")),
              ("teacher losses (.tea)", lambda k: k.endswith(".tea"), ("lgd",)),
              ("distillation loss", lambda k: k == "loss_distill", ("lgd",))]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    styles = ["-", "--", ":", "-."]
    for ax, (title, keep, arms) in zip(axes, panels):
        _shade_window(ax, window)
        for arm in arms:
            per_run = [_loss_series(res["rows"], keep) for run, res in results.items() if run.arm == arm]
            names = sorted(set().union(*per_run)) if per_run else []
            for i, name in enumerate(names):
                xs, mean, _, _ = _mean_band([terms[name] for terms in per_run if name in terms])
                if xs:
                    ax.plot(xs, mean, linestyle=styles[i % len(styles)], color=ARM_COLORS[arm],
                            label=f"{ARM_LABELS[arm]} {name}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "losses.png", dpi=110)
    plt.close(fig)
    written.append("losses.png")
    return written, None

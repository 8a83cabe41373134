"""What each command prints: the CLI's renderers of the engines' results (the engines only return data).

Heavy modules are imported inside the renderers that need them, so that `lgd --help` stays instant.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lgd_cli.console import console, metrics_table, table

if TYPE_CHECKING:
    from lgd_cli.engine.predict import PredictResult
    from lgd_cli.export import ExportResult
    from lgd_cli.modeling.backbones.swin_convert import ConversionReport


def evaluation(results: dict) -> None:
    """Print the AP tables of `evaluate_checkpoint`'s result."""
    from lgd_cli.engine.evaluate import SUMMARY_KEYS

    for who in ("student", "teacher"):
        if who not in results:
            continue
        for task, metrics in results[who].items():
            title = f"{who} {task} AP on {Path(results['dataset']).name}"
            console.print(metrics_table(title, {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}))
            if who == "teacher":
                console.print("note: the teacher reads the ground truth, so its AP is an upper bound, "
                              "not a deployable model's", soft_wrap=True, highlight=False)
            per_class = [(k[3:], v) for k, v in metrics.items() if k.startswith("AP-")]
            if per_class:
                console.print(table(f"{who} {task} AP per category", ["category", "AP"], per_class))
    console.print(f"metrics written to {results['metrics_file']}")


def export(result: ExportResult) -> None:
    """Print what `export_checkpoint` wrote and how closely it matches eager PyTorch."""
    from lgd_cli.export.verify import BOX_ATOL, BOX_RTOL, SCORE_ATOL

    size_mb = result.output.stat().st_size / 2**20
    rows = [["file", str(result.output)], ["format", result.format], ["size", f"{size_mb:.1f} MiB"],
            ["parameters", f"{result.parameters:,} (student only)"]]
    c = result.comparison
    if c is not None:
        rows += [["detections (eager / exported)", f"{c.num_eager} / {c.num_exported} at sizes {c.sizes}"],
                 ["largest box difference", f"{c.max_box_diff:.3g} px (tolerance {BOX_ATOL:g} + {BOX_RTOL:g} x coordinate)"],
                 ["largest score difference", f"{c.max_score_diff:.3g} (tolerance {SCORE_ATOL:g})"]]
    rows += [["sidecar", str(result.sidecar)]]
    console.print(table(f"lgd export ({result.seconds:.1f} s)", ["", "value"], rows))
    if c is not None and not any(c.num_eager):
        console.print("[yellow]verified on nothing[/]: the student detects nothing on the sample image above "
                      "its score threshold, so the check compared empty outputs")
    elif c is not None:
        console.print("[green]verified[/]: the exported model matches the eager student")
    else:
        console.print(f"[yellow]not verified[/]: {result.skipped}; install it with pip install 'lgd[onnx]' "
                      "and export again to check the file")


def predictions(result: PredictResult) -> None:
    """Print one row per image and where the detections went."""

    rows = [[str(image), count, str(png)] for image, png, count in result.images]
    console.print(table(f"lgd predict (score > {result.score_thresh:g})", ["image", "detections", "drawn"], rows))
    console.print(f"detections written to {result.detections_file} (COCO results format)")


def swin_conversion(report: ConversionReport) -> None:
    """One line for what was written, a table of the dropped keys grouped by pattern and reason."""
    from lgd_cli.modeling.backbones.swin_convert import describe_architecture, key_pattern


    groups: dict[tuple[str, str], int] = {}
    for key, why in report.dropped:
        groups[(key_pattern(key), why)] = groups.get((key_pattern(key), why), 0) + 1
    console.print(f"read {report.source} ({report.layout} layout): Swin {describe_architecture(report.architecture)}",
                  highlight=False, soft_wrap=True)
    if groups:
        console.print(table(f"dropped {len(report.dropped)} tensors", ["key", "count", "why"],
                            [[pattern, count, why] for (pattern, why), count in groups.items()]))
    console.print(f"wrote {report.kept} tensors to {report.target}", highlight=False, soft_wrap=True)
    console.print(f"use it with --set MODEL.WEIGHTS={report.target} (MODEL.SWINT must match: "
                  f"EMBED_DIM {report.architecture['embed_dim']}, DEPTHS {report.architecture['depths']}, "
                  f"NUM_HEADS {report.architecture['num_heads']}, WINDOW_SIZE {report.architecture['window_size']})",
                  highlight=False, soft_wrap=True)


def benchmark(result: dict) -> None:
    """Print the benchmark table (and profiles)."""
    t, f, m = result["train"], result["flops"], result["memory"]
    spread = [f"{t[f'{arm}_s_per_iter_min']:.3f}-{t[f'{arm}_s_per_iter_max']:.3f}" for arm in ("baseline", "lgd")]
    rows = [
        ["train s/iter", t["baseline_s_per_iter"], t["lgd_s_per_iter"], t["lgd_over_baseline"]],
        ["train s/iter min-max", *spread, ""],
        ["train images/s", t["baseline_images_per_s"], t["lgd_images_per_s"], t["baseline_images_per_s"] and t["lgd_images_per_s"] / t["baseline_images_per_s"]],
        ["train GFLOPs/step", f["baseline_train_gflops"], f["lgd_train_gflops"], f["lgd_over_baseline"]],
        ["peak memory MB", m["baseline_peak_mb"], m["lgd_peak_mb"], m["lgd_over_baseline"]],
    ]
    title = (f"lgd benchmark: {result['preset']} on {result['device']}, batch {result['batch']}, "
             f"{result.get('precision', 'fp32')}, median of {result['iters']} steps")
    console.print(table(title, ["", "baseline", "LGD", "LGD / baseline"], rows))
    console.print(table("model", ["", "value"], [
        ["student parameters (deployed)", result["params"]["student"]],
        ["LGD-only parameters (dropped after training)", result["params"]["lgd_only"]],
        ["student inference ms/image (eager)", result["inference"]["eager_ms_per_image"]],
        *[[f"student inference ms/image ({fmt}; / eager)",
           f"{result['inference'][f'{fmt}_ms_per_image']:.2f} ({result['inference'][f'{fmt}_over_eager']:.2f})"]
          for fmt in ("torchscript", "onnx") if f"{fmt}_ms_per_image" in result["inference"]],
    ]))
    for text in result.get("warnings", []):
        console.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)
    for arm, text in result.get("profile", {}).items():
        console.print(f"[bold]{arm} step profile[/]")
        console.print(text, soft_wrap=True, highlight=False, markup=False)


def comparison(report: dict) -> None:
    """Print the comparison as rich tables plus the verdict."""
    from lgd_cli.compare.report import (ARM_NAMES, NO_VERDICT, cost_rows, interval_line, report_title, run_columns,
                                        run_rows, summary_rows)


    console.print(table(report_title(report), ["metric", ARM_NAMES["baseline"], ARM_NAMES["lgd"],
                                         "LGD − baseline [95%]"], summary_rows(report)))
    console.print(table("training cost", ["", ARM_NAMES["baseline"], ARM_NAMES["lgd"], "LGD / baseline"],
                        cost_rows(report)))
    # The terminal gets the headline metrics per run; compare.md has them all.
    short = ("AP", "AP50", "AP75")
    console.print(table("runs", run_columns(report, short), run_rows(report, short)))
    console.print(interval_line(report), highlight=False, soft_wrap=True)
    for text in report["notes"].values():
        console.print(f"note: {text}", highlight=False, soft_wrap=True)
    console.print(f"[bold]verdict:[/] {report['verdict'] or NO_VERDICT}", highlight=False,
                  soft_wrap=True)
    if report.get("plots_skipped"):
        console.print(f"plots skipped: {report['plots_skipped']}", highlight=False, soft_wrap=True)
    for name in ("compare.json", "compare.md", *report.get("plots", [])):
        console.print(f"wrote {Path(report['output']) / Path(name).name}", highlight=False, soft_wrap=True)

"""run_comparison(): the whole `lgd compare`: guard the folder, run what is missing, report, plot."""
from __future__ import annotations

from pathlib import Path

from lgd_cli.compare import plots, report as reporting
from lgd_cli.compare.runner import CompareSettings, execute, load_results, prepare_output
from lgd_cli.files import atomic_write_bytes, atomic_write_json


def run_comparison(settings: CompareSettings, output: Path, *, jobs: int = 1, resume: bool = False,
                   show_progress: bool = True) -> dict:
    """Train and evaluate both arms for every seed (reusing finished runs), then write the report.

    Returns:
        compare.json's dict plus "output", "plots" (file names) and "plots_skipped" (reason or None).
        Failed runs are listed in "failed" (the report covers the runs that finished).
    """
    output = Path(output)
    prepare_output(output, settings, resume)
    if show_progress:
        from lgd_cli.console import training_progress

        with training_progress() as progress:
            outcomes = execute(settings, output, jobs=jobs, progress=progress)
    else:
        outcomes = execute(settings, output, jobs=jobs)
    results = load_results(settings, output)
    report = reporting.build_report(settings, results, outcomes)
    written, skipped = plots.write_plots(report, results, output)
    report.update({"output": str(output), "plots": written, "plots_skipped": skipped})
    atomic_write_json(output / "compare.json", report)
    text = reporting.markdown(report, written, skipped)
    atomic_write_bytes(output / "compare.md", lambda f: f.write(text.encode()))
    return report

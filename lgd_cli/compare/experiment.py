"""run_comparison(): the whole `lgd compare`: guard the folder, run what is missing, report, plot."""
from __future__ import annotations

from pathlib import Path

from lgd_cli.compare import plots, report as reporting
from lgd_cli.compare.runner import CompareSettings, execute, load_results, prepare_output
from lgd_cli.files import atomic_write_bytes, atomic_write_json


def run_comparison(settings: CompareSettings, output: Path, *, jobs: int = 1, resume: bool = False,
                   display=None) -> dict:
    """Train and evaluate both arms for every seed (reusing finished runs), then write the report.

    `display` shows a progress bar per run (lgd_cli/engine/display.py); None: none.

    Returns:
        compare.json's dict plus "output", "plots" (file names) and "plots_skipped" (reason or None).
        Failed runs are listed in "failed" (the report covers the runs that finished).
    """
    output = Path(output)
    prepare_output(output, settings, resume)
    progress = display.progress() if display is not None else None
    if progress is not None:
        with progress:
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

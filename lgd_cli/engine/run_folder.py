"""What a run folder holds, and the rules for starting, resuming or replacing a run in one."""
from __future__ import annotations

import shutil
from pathlib import Path

from lgd_cli.errors import ConfigError

# What a run folder holds; `--force` removes exactly these, nothing else of the user's.
RUN_FILES = ("last_checkpoint", "config.yaml", "metrics.json", "summary.json", "log.txt")
RUN_GLOBS = ("model_*.pth", "events.out.tfevents.*", ".*.tmp", "log.txt.rank*")


def holds_run(output: Path) -> bool:
    return any((output / name).exists() for name in ("last_checkpoint", "config.yaml", "metrics.json"))


def clear_run(output: Path) -> None:
    for name in RUN_FILES:
        (output / name).unlink(missing_ok=True)
    for pattern in RUN_GLOBS:
        for path in output.glob(pattern):
            path.unlink()
    shutil.rmtree(output / "eval", ignore_errors=True)


def prepare_output(output: Path, resume: bool, force: bool) -> None:
    if resume and force:
        raise ConfigError("--resume and --force contradict each other: continue the run, or start afresh")
    if holds_run(output):
        if force:
            clear_run(output)
        elif not resume:
            raise ConfigError(f"{output} already holds a training run",
                              hint="add --resume to continue it, or --force to start afresh (deletes its checkpoints)")
    output.mkdir(parents=True, exist_ok=True)

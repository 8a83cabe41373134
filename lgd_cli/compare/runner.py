"""The runs of a comparison: settings, the output folder's guard, fresh processes, reuse of finished runs.

Layout: DIR/compare-settings.json (what makes two comparisons the same), DIR/seed<S>/<arm>/ one
`lgd train` run folder each (+ run.json, result.json, compare.log), then compare.json,
compare.md and the PNGs written by report.py and plots.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lgd_cli.compare.worker import RESULT, RUN_SPEC
from lgd_cli.errors import ConfigError
from lgd_cli.files import atomic_write_json, read_metrics

SETTINGS_FILE = "compare-settings.json"
ARMS = ("baseline", "lgd")
# Keys a comparison sets per run: a --set of one would break the pairing or the arms.
_RESERVED_KEYS = ("SEED", "MODEL.DISTILLATOR.ENABLED")
# What makes two comparisons the same one (resuming) or different ones (refused).
_IDENTITY = ("preset", "recipe", "seeds", "iters", "eval_period", "data", "overrides")


@dataclass(frozen=True)
class CompareSettings:
    """What a comparison trains: `seeds` seeds × (baseline, LGD) of one recipe on one dataset.

    Attributes:
        preset: the preset name or YAML path, as given; preset_file: the file it resolved to.
        recipe: a hash of the resolved config (device aside): an edited preset file or changed
            defaults make another comparison.
        overrides: KEY=VALUE pairs common to every run (data options, --iters, --eval-period, --set).
        iters, eval_period: the resolved SOLVER.MAX_ITER and TEST.EVAL_PERIOD.
        data: the resolved LGD.DATA paths (train/val json and images).
        interval: "t" or "bootstrap" (the paired difference's interval; not part of the identity).
    """

    preset: str
    preset_file: str
    recipe: str
    overrides: tuple[str, ...]
    seeds: int
    iters: int
    eval_period: int
    data: dict = field(default_factory=dict)
    device: str = "cpu"
    interval: str = "t"

    def to_json(self) -> dict:
        return {"preset": self.preset, "preset_file": self.preset_file, "recipe": self.recipe,
                "overrides": list(self.overrides),
                "seeds": self.seeds, "iters": self.iters, "eval_period": self.eval_period, "data": dict(self.data),
                "device": self.device, "interval": self.interval}

    def identity(self) -> dict:
        return {k: self.to_json()[k] for k in _IDENTITY}


def make_settings(preset: str, overrides: list[str], *, seeds: int, device: str | None, interval: str = "t",
                  eval_points: int = 5) -> CompareSettings:
    """Build (and so validate) the config of a comparison once, before any process starts.

    Args:
        overrides: KEY=VALUE pairs; an explicit TEST.EVAL_PERIOD among them wins, otherwise the
            runs are evaluated `eval_points` times (for the AP curves).
    """
    from lgd_cli.config.build import build_config
    from lgd_cli.config.presets import resolve_preset

    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in _RESERVED_KEYS:
            raise ConfigError(f"--set {key} is set by lgd compare itself (seeds 0..N-1, both arms)",
                              hint="use --seeds N; the baseline and LGD arms are always both trained")
    cfg = build_config(preset, overrides, device=device)
    if not any(item.partition("=")[0].strip() == "TEST.EVAL_PERIOD" for item in overrides):
        period = max(1, -(-cfg.SOLVER.MAX_ITER // eval_points))  # ceil: the last point is the final eval
        overrides = [f"TEST.EVAL_PERIOD={period}"] + list(overrides)
        cfg = build_config(preset, overrides, device=device)
    recipe = cfg.clone()
    recipe.defrost()
    recipe.MODEL.DEVICE, recipe.SEED, recipe.MODEL.DISTILLATOR.ENABLED = "", 0, True
    d = cfg.LGD.DATA
    return CompareSettings(
        preset=preset, preset_file=str(resolve_preset(preset).resolve()),
        recipe=hashlib.sha256(recipe.dump().encode()).hexdigest()[:16], overrides=tuple(overrides),
        seeds=seeds, iters=cfg.SOLVER.MAX_ITER, eval_period=cfg.TEST.EVAL_PERIOD,
        data={"TRAIN_JSON": d.TRAIN_JSON, "TRAIN_IMAGES": d.TRAIN_IMAGES, "VAL_JSON": d.VAL_JSON,
              "VAL_IMAGES": d.VAL_IMAGES},
        device=cfg.MODEL.DEVICE, interval=interval)


@dataclass(frozen=True)
class Run:
    seed: int
    arm: str  # "baseline" or "lgd"

    @property
    def name(self) -> str:
        return f"seed{self.seed}/{self.arm}"

    def folder(self, output: Path) -> Path:
        return output / f"seed{self.seed}" / self.arm


def planned_runs(settings: CompareSettings) -> list[Run]:
    """Seed by seed, baseline then LGD: an interrupted comparison has whole pairs first."""
    return [Run(seed, arm) for seed in range(settings.seeds) for arm in ARMS]


def is_finished(run: Run, output: Path) -> bool:
    folder = run.folder(output)
    return (folder / "model_final.pth").is_file() and (folder / RESULT).is_file()


def prepare_output(output: Path, settings: CompareSettings, resume: bool) -> None:
    """Refuse a folder holding another comparison (or anything else); record the settings."""
    settings_path = output / SETTINGS_FILE
    if settings_path.is_file():
        try:
            theirs = json.loads(settings_path.read_text()).get("identity", {})
        except (json.JSONDecodeError, AttributeError):
            theirs = {}
        ours = settings.identity()
        differ = [k for k in _IDENTITY if theirs.get(k) != ours[k]]
        if differ:
            details = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} now" for k in differ)
            raise ConfigError(f"{output} holds a comparison with other settings ({details})",
                              hint="choose another --output, or repeat that comparison's own options")
        if not resume:
            raise ConfigError(f"{output} already holds this comparison",
                              hint="add --resume to reuse its finished runs and complete it, or choose another --output")
    elif output.exists() and any(output.iterdir()):
        raise ConfigError(f"{output} is not empty and holds no comparison ({SETTINGS_FILE} missing)",
                          hint="choose a new or empty --output folder")
    output.mkdir(parents=True, exist_ok=True)
    record = {**settings.to_json(), "identity": settings.identity()}
    atomic_write_json(settings_path, record)


def run_spec(settings: CompareSettings, run: Run) -> dict:
    """What the worker builds its config from: the common overrides, then this run's seed and arm."""
    # One periodic checkpoint is enough to resume an arm, and a demo checkpoint is ~170 MB: a
    # 3-seed comparison would otherwise keep up to 18 of them beside the finals (a --set wins).
    overrides = ["LGD.CHECKPOINT_KEEP=1"] + list(settings.overrides) + [
        f"SEED={run.seed}", f"MODEL.DISTILLATOR.ENABLED={run.arm == 'lgd'}"]
    return {"preset": settings.preset, "overrides": overrides, "device": settings.device,
            "seed": run.seed, "arm": run.arm}


@dataclass
class RunOutcome:
    run: Run
    reused: bool
    exit_code: int = 0
    error: str = ""


def _worker_env(settings: CompareSettings, jobs: int) -> dict:
    env = dict(os.environ)
    if jobs > 1 and not settings.device.startswith("cuda") and "OMP_NUM_THREADS" not in env:
        # J runs at once share the cores instead of each using all of them.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def _iterations_done(folder: Path) -> int:
    """Progress of a running run, from the end of its metrics.json (written every 20 iterations)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        tail = f.read().decode(errors="replace").splitlines()
    for line in reversed(tail):
        try:
            return int(json.loads(line)["iteration"]) + 1
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _start(settings: CompareSettings, run: Run, output: Path, env: dict) -> tuple[subprocess.Popen, object]:
    """Start the worker process of `run`; its output goes to compare.log in the run folder."""
    folder = run.folder(output)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / RUN_SPEC, run_spec(settings, run))
    log = open(folder / "compare.log", "ab")
    # Its own session: a Ctrl-C reaches the run once, forwarded by execute(), not twice
    # (train's second SIGINT aborts without a checkpoint).
    proc = subprocess.Popen([sys.executable, "-m", "lgd_cli.compare.worker", str(folder)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    return proc, log


def execute(settings: CompareSettings, output: Path, *, jobs: int = 1, progress=None,
            poll_s: float = 1.0) -> list[RunOutcome]:
    """Run every unfinished run in its own process, `jobs` at a time; reuse the finished ones.

    An interrupted run is resumed from its newest checkpoint (train's --resume); a failed one is
    reported in its RunOutcome (exit code, last error line, log in its folder), the others go on.
    """
    outcomes = {}
    pending = []
    for run in planned_runs(settings):
        if is_finished(run, output):
            outcomes[run] = RunOutcome(run, reused=True)
        else:
            pending.append(run)
    tasks = {}
    if progress is not None:
        for run in planned_runs(settings):
            total = settings.iters
            done = total if outcomes.get(run) else _iterations_done(run.folder(output))
            tasks[run] = progress.add_task(run.name + (" (reused)" if run in outcomes else ""),
                                           total=total, completed=done, detail="")
    running: dict[Run, tuple[subprocess.Popen, object]] = {}
    env = _worker_env(settings, jobs)
    previous_term = None
    if threading.current_thread() is threading.main_thread():
        previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while pending or running:
            while pending and len(running) < max(1, jobs):
                run = pending.pop(0)
                running[run] = _start(settings, run, output, env)
            time.sleep(poll_s)
            for run, (proc, log) in list(running.items()):
                if progress is not None:
                    progress.update(tasks[run], completed=_iterations_done(run.folder(output)))
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[run]
                finished = code == 0 and is_finished(run, output)
                outcomes[run] = RunOutcome(run, reused=False, exit_code=code,
                                           error="" if finished else _last_error(run.folder(output) / "compare.log"))
                if progress is not None:
                    progress.update(tasks[run], description=run.name + ("" if finished else " (failed)"),
                                    completed=settings.iters if finished else None)
    except BaseException:
        # Ctrl-C, SIGTERM or a bug: each run checkpoints and stops (train's graceful stop) first.
        for proc, log in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, log in running.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        raise
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return [outcomes[run] for run in planned_runs(settings)]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def load_results(settings: CompareSettings, output: Path) -> dict[Run, dict]:
    """result.json and the metrics.json rows of every finished run."""
    results = {}
    for run in planned_runs(settings):
        if is_finished(run, output):
            folder = run.folder(output)
            results[run] = {**json.loads((folder / RESULT).read_text()),
                            "rows": read_metrics(folder / "metrics.json"), "folder": str(folder)}
    return results

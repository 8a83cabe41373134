"""The `lgd` command line: parse options, call one engine function, render the result.

Heavy imports (torch, detectron2) happen inside the commands so that `lgd --help` is instant.
"""
from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from lgd_cli import __version__, render
from lgd_cli.compat import typer as _typer_compat
from lgd_cli.console import console, print_error
from lgd_cli.errors import INTERRUPTED_EXIT_CODE, LGDError, user_error

_typer_compat.apply()

app = typer.Typer(
    name="lgd",
    help="Train, evaluate, export and benchmark object detectors with LGD "
    "(Label-Guided self-Distillation, AAAI 2022) on detectron2.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Create and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


class BadBoxes(str, Enum):  # lgd_cli.config.choices.BAD_BOX_POLICIES
    clip = "clip"
    drop = "drop"
    error = "error"


class ExportFormat(str, Enum):
    torchscript = "torchscript"
    onnx = "onnx"


class Interval(str, Enum):  # lgd_cli.compare.stats.METHODS
    t = "t"
    bootstrap = "bootstrap"


# Options shared by several commands: declared once.
SetOption = Annotated[Optional[List[str]], typer.Option(
    "--set", help="Override a config key, KEY=VALUE (repeatable; the last one wins), "
    "e.g. --set MODEL.DISTILLATOR.LAMBDA=0.5.", metavar="KEY=VALUE")]
DeviceOption = Annotated[Optional[str], typer.Option(
    "--device", metavar="DEVICE",
    help="cpu, cuda (the first GPU) or cuda:N (GPU N). Default: cuda when available, else cpu.")]
PresetOption = Annotated[str, typer.Option("--preset", "-p", help="Preset name (`lgd presets`) or a YAML file.")]
DataRootOption = Annotated[Optional[Path], typer.Option(
    "--data-root", help="COCO folder (annotations/, train2017/, val2017/) for COCO presets.")]
TrainJsonOption = Annotated[Optional[Path], typer.Option(
    "--train-json", help="COCO-format training annotations (custom dataset).")]
TrainImagesOption = Annotated[Optional[Path], typer.Option("--train-images", help="Folder of the training images.")]
ValJsonOption = Annotated[Optional[Path], typer.Option("--val-json", help="COCO-format validation annotations.")]
ValImagesOption = Annotated[Optional[Path], typer.Option("--val-images", help="Folder of the validation images.")]

# `lgd train`'s options that stand for one config key: value options give KEY=<value>; flags
# (given as the pair they set) add that pair when present.
TRAIN_OPTION_KEYS = {
    "iters": "SOLVER.MAX_ITER",
    "batch_size": "SOLVER.IMS_PER_BATCH",
    "seed": "SEED",
    "eval_period": "TEST.EVAL_PERIOD",
    "workers": "DATALOADER.NUM_WORKERS",
    "keep": "LGD.CHECKPOINT_KEEP",
    "bad_boxes": "LGD.DATA.BAD_BOXES",
    "skip_nonfinite": "LGD.SKIP_NONFINITE",
    "no_lgd": "MODEL.DISTILLATOR.ENABLED=False",
    "skip_bad_images": "LGD.DATA.SKIP_BAD_IMAGES=True",
    "allow_outside_root": "LGD.DATA.ALLOW_OUTSIDE_ROOT=True",
}
COMPARE_OPTION_KEYS = {"iters": "SOLVER.MAX_ITER", "eval_period": "TEST.EVAL_PERIOD"}
BENCHMARK_OPTION_KEYS = {"batch_size": "SOLVER.IMS_PER_BATCH"}


def option_pairs(values: dict, keys: dict) -> list[str]:
    """The config pairs of the options in `values` ({parameter: value}) that `keys` maps."""
    pairs = []
    for name, key in keys.items():
        value = values.get(name)
        if value is None or value is False:
            continue
        if "=" in key:
            pairs.append(key)
        else:
            pairs.append(f"{key}={value.value if isinstance(value, Enum) else value}")
    return pairs


def _version(value: bool) -> None:
    if value:
        console.print(f"lgd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show the full traceback of errors (also LGD_DEBUG=1).")) -> None:
    """Train, evaluate, export and benchmark object detectors with LGD on detectron2."""
    import logging

    from lgd_cli.console import setup_logging

    debug = debug or os.environ.get("LGD_DEBUG") == "1"
    if debug:
        os.environ["LGD_DEBUG"] = "1"  # main() re-raises; `lgd compare`'s run processes read it too
    setup_logging()
    # The engines show tracebacks of failed processes when their logger is at DEBUG (engine/launch.py).
    logging.getLogger("lgd_cli").setLevel(logging.DEBUG if debug else logging.INFO)


def _data_pairs(data_root, train_json, train_images, val_json, val_images) -> list[str]:
    """The data options of `train` and `compare` as config pairs."""
    pairs = []
    if data_root is not None:
        pairs += ["LGD.DATA.SOURCE=coco", f"LGD.DATA.ROOT={data_root}"]
    custom = {"TRAIN_JSON": train_json, "TRAIN_IMAGES": train_images, "VAL_JSON": val_json, "VAL_IMAGES": val_images}
    if any(v is not None for v in custom.values()):
        pairs.append("LGD.DATA.SOURCE=custom")
        pairs += [f"LGD.DATA.{k}={v.resolve()}" for k, v in custom.items() if v is not None]
    return pairs


@app.command()
def train(
    ctx: typer.Context,
    preset: PresetOption = "demo",
    overrides: SetOption = None,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder. Default: output/<preset>[-baseline]."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Training iterations (SOLVER.MAX_ITER)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per step, over all processes (SOLVER.IMS_PER_BATCH)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (SEED). Default: the preset's (-1 = random)."),
    eval_period: Optional[int] = typer.Option(None, "--eval-period", min=0, metavar="ITERS", help="Evaluate every ITERS iterations (TEST.EVAL_PERIOD; 0: only at the end)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data-loading processes per training process (DATALOADER.NUM_WORKERS)."),
    no_lgd: bool = typer.Option(False, "--no-lgd", help="Train the plain detector with the same recipe (the baseline)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint (an error where there is no run; a finished one: nothing to do, exit 0)."),
    force: bool = typer.Option(False, "--force", help="Start afresh in an --output folder that already holds a run (not one a live run is using)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config (YAML) and exit; nothing is written."),
    keep: Optional[int] = typer.Option(None, "--keep", min=1, help="Newest periodic checkpoints to keep (LGD.CHECKPOINT_KEEP, default 3); model_final is always kept."),
    bad_boxes: Optional[BadBoxes] = typer.Option(None, "--bad-boxes", help="Boxes outside the image or without area (LGD.DATA.BAD_BOXES): clip (default; drop what has no area left), drop, or error."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Skip training images that cannot be decoded (a warning each) instead of failing (LGD.DATA.SKIP_BAD_IMAGES)."),
    allow_outside_root: bool = typer.Option(False, "--allow-outside-root", help="Accept image file_names that are absolute or climb out of the image folder with '..' (LGD.DATA.ALLOW_OUTSIDE_ROOT)."),
    skip_nonfinite: Optional[int] = typer.Option(None, "--skip-nonfinite", min=0, metavar="K", help="Skip up to K batches whose loss is NaN/inf (no optimiser step) before failing (LGD.SKIP_NONFINITE, default 0)."),
    data_root: DataRootOption = None,
    train_json: TrainJsonOption = None,
    train_images: TrainImagesOption = None,
    val_json: ValJsonOption = None,
    val_images: ValImagesOption = None,
    gpus: int = typer.Option(1, "--gpus", help="Processes on this machine: one per GPU (NCCL), or CPU processes (gloo) without CUDA."),
    machines: int = typer.Option(1, "--machines", help="Number of machines."),
    machine_rank: int = typer.Option(0, "--machine-rank", help="Rank of this machine (0 .. machines-1)."),
    dist_url: str = typer.Option("auto", "--dist-url", help="tcp://HOST:PORT where the machines meet: machine 0's address and a free port, the same on every machine (required with --machines > 1)."),
    join_timeout: float = typer.Option(300.0, "--join-timeout", min=1.0, metavar="SECONDS", help="Seconds the machines wait for each other to start; then they stop, naming the missing ones."),
    device: DeviceOption = None,
) -> None:
    """Train a detector with LGD (or the plain baseline with --no-lgd) and save checkpoints.

    Examples: `lgd train` (the CPU demo on the embedded data);
    `lgd train --preset retinanet-r50-2x --gpus 8 --data-root datasets/coco`;
    `lgd train --output output/demo --resume` (continue an interrupted run);
    on each of 2 machines, `lgd train ... --machines 2 --machine-rank R --dist-url tcp://HOST:PORT`.
    """
    from lgd_cli.config.build import build_config
    from lgd_cli.console import TerminalDisplay
    from lgd_cli.engine import train as engine_train
    from lgd_cli.engine.launch import report_failure

    pairs = option_pairs(ctx.params, TRAIN_OPTION_KEYS)
    pairs += _data_pairs(data_root, train_json, train_images, val_json, val_images)
    try:
        cfg = build_config(preset, pairs + list(overrides or []), device=device)
    except LGDError as exc:
        # The other machines stop too, instead of waiting for this one until --join-timeout.
        report_failure(exc, num_machines=machines, machine_rank=machine_rank, dist_url=dist_url,
                                    wait_s=min(10.0, join_timeout))
        raise
    if print_config:
        console.print(cfg.dump(), markup=False, highlight=False, soft_wrap=True, end="")
        return
    if output is None:
        output = Path("output") / (cfg.LGD.PRESET + ("" if cfg.MODEL.DISTILLATOR.ENABLED else "-baseline"))
    summary = engine_train.train(
        cfg, output, resume=resume, resume_required=resume, force=force, num_processes=gpus,
        num_machines=machines, machine_rank=machine_rank, dist_url=dist_url, join_timeout=join_timeout,
        display=TerminalDisplay())
    render.training(summary, machine_rank=machine_rank, machines=machines)


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `lgd train` (e.g. output/demo/model_final.pth), or its run folder (its last checkpoint)."),
    overrides: SetOption = None,
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Evaluate on another COCO-format set: --data ANN.json --data IMAGES_DIR."),
    eval_teacher: bool = typer.Option(False, "--eval-teacher", help="Also evaluate the LGD teacher (it reads the ground truth: an upper bound, not a deployable model)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where predictions and metrics go. Default: <checkpoint folder>/eval."),
    device: DeviceOption = None,
) -> None:
    """Evaluate a checkpoint with COCO metrics (AP, AP50, AP75, APs/m/l, per category)."""
    from lgd_cli.console import TerminalDisplay
    from lgd_cli.engine import evaluate as engine_eval
    from lgd_cli.engine.checkpoint import resolve_checkpoint

    if data and len(data) != 2:
        raise typer.BadParameter("give --data twice: the annotation json, then the image folder", param_hint="--data")
    results = engine_eval.evaluate_checkpoint(
        resolve_checkpoint(checkpoint), overrides=list(overrides or []), data=tuple(data) if data else None,
        eval_teacher=eval_teacher, output=output, device=device, display=TerminalDisplay())
    render.evaluation(results)


@app.command()
def presets() -> None:
    """List the shipped presets with detector, backbone, schedule and the paper's mAP."""
    from lgd_cli.config.presets import list_presets
    from lgd_cli.console import table

    rows = []
    for info in list_presets():
        meta = info.meta
        paper = meta.get("PAPER_AP", -1)
        mask = meta.get("PAPER_MASK_AP", -1)
        ap = (f"{paper:.1f}" + (f" / {mask:.1f} mask" if mask > 0 else "")) if paper > 0 else "-"
        rows.append([info.name, meta.get("DETECTOR", ""), meta.get("BACKBONE", ""), meta.get("SCHEDULE", ""), ap,
                     meta.get("DESCRIPTION", "")])
    console.print(table("presets (lgd train --preset NAME)",
                        ["name", "detector", "backbone", "schedule", "paper mAP", "what"], rows))


@app.command()
def doctor() -> None:
    """Check the installation: Python, torch, CUDA, detectron2 and where it came from, pycocotools."""
    from lgd_cli.console import table
    from lgd_cli.doctor import run_checks

    checks = run_checks()
    console.print(table("lgd doctor", ["component", "version", "detail", "ok"],
                        [[c.component, c.version, c.detail, "yes" if c.ok else ("NO" if c.required else "no")] for c in checks]))
    broken = [c.component for c in checks if c.required and not c.ok]
    if broken:
        raise LGDError(f"broken: {', '.join(broken)}", hint="re-run `make setup` (see README, Installation)")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Folder to write train/ val/ images and COCO json files into."),
    num_train: int = typer.Option(1000, "--num-train", help="Training images."),
    num_val: int = typer.Option(200, "--num-val", help="Validation images."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives byte-identical files."),
) -> None:
    """Generate the embedded synthetic shapes dataset (COCO format, boxes and polygons)."""
    from lgd_cli.data.synthetic import generate

    paths = generate(out, num_train=num_train, num_val=num_val, seed=seed)
    console.print(f"wrote {paths.train_json} and {paths.val_json}")


@app.command("convert-swin-weights")
def convert_swin_weights(
    source: Path = typer.Argument(..., help="Official or OpenMMLab Swin ImageNet checkpoint (.pth)."),
    target: Optional[Path] = typer.Argument(None, help="Output file. Default: <source stem>_converted.pth beside it."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output file if it exists."),
) -> None:
    """Convert Swin ImageNet weights into a MODEL.WEIGHTS file for lgd's Swin backbone."""
    from lgd_cli.modeling.backbones import swin_convert

    render.swin_conversion(swin_convert.convert_swin_weights(source, target, force=force))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `lgd train`, or its run folder (its last checkpoint)."),
    format: ExportFormat = typer.Option(ExportFormat.torchscript, "--format", help="The exported file's format."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file. Default: <checkpoint folder>/model.ts or model.onnx; the sidecar is <output>.json."),
) -> None:
    """Export the student detector alone (no LGD modules) to TorchScript or ONNX, and verify it."""
    from lgd_cli import export as engine_export
    from lgd_cli.engine.checkpoint import resolve_checkpoint

    render.export(engine_export.export_checkpoint(resolve_checkpoint(checkpoint), format.value, output))


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `lgd train`, or its run folder (its last checkpoint)."),
    images: List[str] = typer.Argument(..., help="Image files, folders (their image files) or quoted glob patterns ('photos/*.jpg')."),
    output: Path = typer.Option(Path("predictions"), "--output", "-o", help="Folder for one drawn PNG per image (small images enlarged) and detections.json."),
    score_thresh: float = typer.Option(0.5, "--score-thresh", min=0.0, max=1.0, help="Keep detections scoring above this (0-1)."),
    data: Optional[Path] = typer.Option(None, "--data", exists=True, dir_okay=False, metavar="ANN.json", help="COCO json listing the images: detections.json uses its image ids (matched by file_name)."),
    device: DeviceOption = None,
) -> None:
    """Detect objects in images with a checkpoint's student: drawn PNGs and COCO-format detections."""
    from lgd_cli.engine import predict as engine_predict
    from lgd_cli.engine.checkpoint import resolve_checkpoint

    render.predictions(engine_predict.predict(resolve_checkpoint(checkpoint), images, output, score_thresh=score_thresh,
                                              device=device, annotations=data))


@app.command()
def benchmark(
    ctx: typer.Context,
    preset: PresetOption = "demo",
    overrides: SetOption = None,
    iters: int = typer.Option(20, "--iters", min=1, help="Timed training steps per arm (after warm-up)."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed steps first."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per step (SOLVER.IMS_PER_BATCH). Default: the preset's."),
    device: DeviceOption = None,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    profile: bool = typer.Option(False, "--profile", help="Add a torch.profiler table of the LGD and baseline steps."),
    export: bool = typer.Option(False, "--export", help="Also time the student's TorchScript and ONNX exports (CPU)."),
) -> None:
    """Measure LGD against the plain detector: step time, FLOPs, peak memory, parameters, inference latency.

    Mixed precision: --set SOLVER.AMP.ENABLED=True (SOLVER.AMP.DTYPE bfloat16 or float16).
    """
    from lgd_cli.engine.benchmark import run_benchmark
    from lgd_cli.files import atomic_write_json
    from lgd_cli.config.build import build_config

    pairs = option_pairs(ctx.params, BENCHMARK_OPTION_KEYS)
    cfg = build_config(preset, pairs + list(overrides or []), device=device)
    result = run_benchmark(cfg, iters=iters, warmup=warmup, profile=profile, export=export)
    render.benchmark(result)
    if json_path is not None:
        atomic_write_json(json_path, result)
        console.print(f"written to {json_path}")


@app.command()
def compare(
    ctx: typer.Context,
    preset: PresetOption = "demo",
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per arm (0..N-1); the interval needs at least 2."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Training iterations of every run (SOLVER.MAX_ITER). Default: the preset's."),
    eval_period: Optional[int] = typer.Option(None, "--eval-period", min=0, help="Evaluate every P iterations for the AP curves (0: only at the end). Default: 5 points per run."),
    overrides: SetOption = None,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Comparison folder. Default: output/compare-<preset>."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Runs trained at once, each in its own process."),
    resume: bool = typer.Option(False, "--resume", help="Complete the comparison in --output: reuse finished runs, resume interrupted ones."),
    interval: Interval = typer.Option(Interval.t, "--interval", help="95% interval of LGD - baseline: t (paired t, default) or bootstrap (percentile; too narrow for few seeds)."),
    data_root: DataRootOption = None,
    train_json: TrainJsonOption = None,
    train_images: TrainImagesOption = None,
    val_json: ValJsonOption = None,
    val_images: ValImagesOption = None,
    device: DeviceOption = None,
) -> None:
    """Measure whether LGD is worth its cost: baseline and LGD, same recipe, data and seeds, with intervals.

    Writes DIR/seed<S>/{baseline,lgd}/ (one training run each), compare.json, compare.md and PNG curves.
    Example: `lgd compare --preset demo --seeds 3 --output output/compare-demo`.
    """
    from lgd_cli.compare.experiment import run_comparison
    from lgd_cli.compare.runner import make_settings
    from lgd_cli.console import TerminalDisplay

    pairs = option_pairs(ctx.params, COMPARE_OPTION_KEYS)
    pairs += _data_pairs(data_root, train_json, train_images, val_json, val_images)
    settings = make_settings(preset, pairs + list(overrides or []), seeds=seeds, device=device, interval=interval.value)
    if output is None:
        output = Path("output") / f"compare-{Path(settings.preset_file).stem}"
    report = run_comparison(settings, output, jobs=jobs, resume=resume, display=TerminalDisplay())
    render.comparison(report)
    if report["failed"]:
        raise LGDError(f"{len(report['failed'])} of {2 * seeds} runs failed: "
                       + "; ".join(f"{f['run']}: {f['error']}" for f in report["failed"]),
                       hint="each run's log is compare.log in its folder; re-run the same command with --resume")


@app.command()
def plot(
    runs: List[Path] = typer.Argument(..., help="Run folders of `lgd train` (each with its metrics.json), overlaid."),
    output: Path = typer.Option(Path("curves.png"), "--output", "-o", help="PNG file to write."),
) -> None:
    """Draw the loss terms and AP against iteration of one or more training runs (needs the `plot` extra).

    Example: `lgd plot output/demo output/demo-baseline --output curves.png`.

    Live curves of a running training: `tensorboard --logdir output/`.
    """
    from lgd_cli.compare.plots import plot_runs

    written = plot_runs(runs, output)
    console.print(f"wrote {written}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console entry point: run the app, turn LGDError and Ctrl-C into messages and exit codes."""
    try:
        # Without standalone mode click returns typer.Exit's code instead of exiting.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(INTERRUPTED_EXIT_CODE)
    except (LGDError, OSError, KeyboardInterrupt) as exc:
        if isinstance(exc, LGDError) and exc.exit_code == 0:  # RunFinished: nothing to do, not a failure
            console.print(exc.message, highlight=False, soft_wrap=True)
            if exc.hint:
                console.print(exc.hint, highlight=False, soft_wrap=True)
            sys.exit(0)
        error = user_error(exc, interrupted_hint="resume a training run with the same command plus --resume")
        if error is None:
            raise
        print_error(error.message, error.hint)
        sys.exit(error.exit_code)
    except Exception as exc:
        # click's usage errors (typer vendors click, so match by interface, not class)
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()

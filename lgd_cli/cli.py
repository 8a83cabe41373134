"""The `lgd` command line: parse options, call one engine function, render the result.

Heavy imports (torch, detectron2) happen inside the commands so that `lgd --help` is instant.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lgd_cli import __version__
from lgd_cli.console import console, print_error
from lgd_cli.errors import LgdError, NotImplementedYet

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

# Options shared by several commands: declared once.
SET_OPTION = typer.Option(
    None, "--set", help="Override a config key, KEY=VALUE (repeatable; the last one wins), "
    "e.g. --set MODEL.DISTILLATOR.LAMBDA=0.5.", metavar="KEY=VALUE")
DEVICE_OPTION = typer.Option(None, "--device", help="cpu, cuda or cuda:N. Default: cuda when available, else cpu.")


def _version(value: bool) -> None:
    if value:
        console.print(f"lgd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show the full traceback of errors (also LGD_DEBUG=1).")) -> None:
    """Train, evaluate, export and benchmark object detectors with LGD on detectron2."""
    if debug:
        os.environ["LGD_DEBUG"] = "1"


@app.command()
def train(
    preset: str = typer.Option("demo", "--preset", "-p", help="Preset name (`lgd presets`) or a YAML file."),
    overrides: Optional[List[str]] = SET_OPTION,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder. Default: output/<preset>[-baseline]."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Training iterations (SOLVER.MAX_ITER)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (SEED). Default: the preset's (-1 = random)."),
    no_lgd: bool = typer.Option(False, "--no-lgd", help="Train the plain detector with the same recipe (the baseline)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start afresh in an --output folder that already holds a run."),
    keep: Optional[int] = typer.Option(None, "--keep", min=1, help="Newest periodic checkpoints to keep (LGD.CHECKPOINT_KEEP, default 3); model_final is always kept."),
    bad_boxes: Optional[str] = typer.Option(None, "--bad-boxes", help="Boxes outside the image or without area: clip (default: clip, drop what has no area left), drop, or error."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="COCO folder (annotations/, train2017/, val2017/) for COCO presets."),
    train_json: Optional[Path] = typer.Option(None, "--train-json", help="COCO-format training annotations (custom dataset)."),
    train_images: Optional[Path] = typer.Option(None, "--train-images", help="Folder of the training images."),
    val_json: Optional[Path] = typer.Option(None, "--val-json", help="COCO-format validation annotations."),
    val_images: Optional[Path] = typer.Option(None, "--val-images", help="Folder of the validation images."),
    gpus: int = typer.Option(1, "--gpus", help="Processes on this machine: one per GPU (NCCL), or CPU processes (gloo) without CUDA."),
    machines: int = typer.Option(1, "--machines", help="Number of machines."),
    machine_rank: int = typer.Option(0, "--machine-rank", help="Rank of this machine (0 .. machines-1)."),
    dist_url: str = typer.Option("auto", "--dist-url", help="tcp://HOST:PORT of machine 0 for multi-machine runs."),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """Train a detector with LGD (or the plain baseline with --no-lgd) and save checkpoints.

    Examples: `lgd train` (the CPU demo on the embedded data);
    `lgd train --preset retinanet-r50-2x --gpus 8 --data-root datasets/coco`;
    `lgd train --output output/demo --resume` (continue an interrupted run).
    """
    from lgd_cli.config.build import build_config
    from lgd_cli.engine import train as engine_train

    pairs = []
    if iters is not None:
        pairs.append(f"SOLVER.MAX_ITER={iters}")
    if seed is not None:
        pairs.append(f"SEED={seed}")
    if no_lgd:
        pairs.append("MODEL.DISTILLATOR.ENABLED=False")
    if keep is not None:
        pairs.append(f"LGD.CHECKPOINT_KEEP={keep}")
    if bad_boxes is not None:
        pairs.append(f"LGD.DATA.BAD_BOXES={bad_boxes}")
    if data_root is not None:
        pairs += ["LGD.DATA.SOURCE=coco", f"LGD.DATA.ROOT={data_root}"]
    custom = {"TRAIN_JSON": train_json, "TRAIN_IMAGES": train_images, "VAL_JSON": val_json, "VAL_IMAGES": val_images}
    if any(v is not None for v in custom.values()):
        pairs.append("LGD.DATA.SOURCE=custom")
        pairs += [f"LGD.DATA.{k}={v.resolve()}" for k, v in custom.items() if v is not None]
    cfg = build_config(preset, pairs + list(overrides or []), device=device)
    if output is None:
        output = Path("output") / (cfg.LGD.PRESET + ("" if cfg.MODEL.DISTILLATOR.ENABLED else "-baseline"))
    summary = engine_train.train(
        cfg, output, resume=resume, force=force, num_processes=gpus,
        num_machines=machines, machine_rank=machine_rank, dist_url=dist_url)
    from lgd_cli.console import metrics_table

    console.print(metrics_table("training finished", summary))
    console.print(f"evaluate it: lgd eval {summary['final_checkpoint']}")


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `lgd train` (e.g. output/demo/model_final.pth)."),
    overrides: Optional[List[str]] = SET_OPTION,
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Evaluate on another COCO-format set: --data ANN.json --data IMAGES_DIR."),
    eval_teacher: bool = typer.Option(False, "--eval-teacher", help="Also evaluate the LGD teacher (it reads the ground truth: an upper bound, not a deployable model)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where predictions and metrics go. Default: <checkpoint folder>/eval."),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """Evaluate a checkpoint with COCO metrics (AP, AP50, AP75, APs/m/l, per category)."""
    from lgd_cli.engine import evaluate as engine_eval

    if data and len(data) != 2:
        raise typer.BadParameter("give --data twice: the annotation json, then the image folder", param_hint="--data")
    results = engine_eval.evaluate_checkpoint(
        checkpoint, overrides=list(overrides or []), data=tuple(data) if data else None,
        eval_teacher=eval_teacher, output=output, device=device)
    engine_eval.render(results)


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
        raise LgdError(f"broken: {', '.join(broken)}", hint="re-run `make setup` (see README, Installation)")


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


def _not_yet(command: str, issue: str) -> None:
    raise NotImplementedYet(f"`lgd {command}` is not implemented yet", hint=f"tracked in the issue '{issue}'")


@app.command("convert-swin-weights")
def convert_swin_weights(
    source: Path = typer.Argument(..., help="Official or OpenMMLab Swin ImageNet checkpoint."),
    target: Optional[Path] = typer.Argument(None, help="Output file. Default: <source>_lgd.pth."),
) -> None:
    """Convert Swin-Tiny ImageNet weights into the layout of lgd's Swin backbone."""
    _not_yet("convert-swin-weights", "Every detector and backbone of the paper")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `lgd train`."),
    format: str = typer.Option("torchscript", "--format", help="torchscript or onnx."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file. Default: <checkpoint folder>/model.ts or model.onnx; the sidecar is <output>.json."),
) -> None:
    """Export the student detector alone (no LGD modules) to TorchScript or ONNX, and verify it."""
    from lgd_cli import export as engine_export

    engine_export.render(engine_export.export_checkpoint(checkpoint, format, output))


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `lgd train`."),
    images: List[Path] = typer.Argument(..., help="Image files (PNG, JPEG, ...)."),
    output: Path = typer.Option(Path("predictions"), "--output", "-o", help="Folder for one drawn PNG per image and detections.json."),
    score_thresh: float = typer.Option(0.5, "--score-thresh", min=0.0, max=1.0, help="Keep detections scoring above this (0-1)."),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """Detect objects in images with a checkpoint's student: drawn PNGs and COCO-format detections."""
    from lgd_cli import predict as engine_predict

    engine_predict.render(engine_predict.predict(checkpoint, images, output, score_thresh=score_thresh, device=device))


@app.command()
def benchmark(
    preset: str = typer.Option("demo", "--preset", "-p", help="Preset name (`lgd presets`) or a YAML file."),
    overrides: Optional[List[str]] = SET_OPTION,
    iters: int = typer.Option(20, "--iters", min=1, help="Timed training steps per arm (after warm-up)."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed steps first."),
    device: Optional[str] = DEVICE_OPTION,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    profile: bool = typer.Option(False, "--profile", help="Add a torch.profiler table of the LGD and baseline steps."),
    export: bool = typer.Option(False, "--export", help="Also time the student's TorchScript and ONNX exports (CPU)."),
) -> None:
    """Measure LGD against the plain detector: step time, FLOPs, peak memory, parameters, inference latency."""
    from lgd_cli.benchmark import render, run_benchmark
    from lgd_cli.config.build import build_config

    cfg = build_config(preset, list(overrides or []), device=device)
    render(run_benchmark(cfg, iters=iters, warmup=warmup, profile=profile, export=export), json_path)


def main() -> None:
    """Console entry point: run the app, turn LgdError and Ctrl-C into messages and exit codes."""
    try:
        # Without standalone mode click returns typer.Exit's code instead of exiting.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except LgdError as exc:
        if os.environ.get("LGD_DEBUG") == "1":
            raise
        print_error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print_error("interrupted", "resume a training run with the same command plus --resume")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        # click's usage errors (typer vendors click, so match by interface, not class)
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()

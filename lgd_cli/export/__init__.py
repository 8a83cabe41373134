"""`lgd export`: the student alone to TorchScript or ONNX, verified against eager PyTorch before it is kept.

trace.py builds and traces the student; verify.py reloads the file, compares and writes the sidecar.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lgd_cli.compat import detectron2 as _compat
from lgd_cli.errors import ConfigError, LGDError
from lgd_cli.files import failed_writes_name, staged_path

if TYPE_CHECKING:
    from lgd_cli.export.verify import Comparison

_compat.apply()  # before any detectron2 import below this package: see lgd_cli/compat/detectron2.py

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}  # format -> default file name


@dataclass
class ExportResult:
    """What `export_checkpoint` wrote and measured.

    Args:
        output, sidecar: the exported file and its `<output>.json`.
        parameters: parameter count of the exported student (no teacher, no adapter).
        comparison: exported vs eager detections (a verify.Comparison), None when not checked.
        skipped: why the check did not run (ONNX without onnxruntime), else None.
        seconds: export + verification wall time.
    """

    format: str
    output: Path
    sidecar: Path
    parameters: int
    comparison: Comparison | None
    skipped: str | None
    seconds: float


def export_checkpoint(checkpoint: Path, fmt: str = "torchscript", output: Path | None = None) -> ExportResult:
    """Export the student of an lgd checkpoint, check the file against eager PyTorch, write the sidecar.

    The file is written beside `output` under a temporary name and renamed over it only once its
    detections match the eager student's on a sample image (verify.py states the tolerances); on a
    mismatch nothing is written and an LGDError says by how much they differ. Runs on the CPU.

    Args:
        checkpoint: a file written by `lgd train`.
        fmt: "torchscript" or "onnx".
        output: target file; default <checkpoint folder>/model.ts or model.onnx.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'", hint=f"use one of: {', '.join(FORMATS)}")
    from lgd_cli.export import trace, verify

    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    student, cfg = trace.load_student(checkpoint, device="cpu")
    output = Path(output) if output is not None else checkpoint.parent / FORMATS[fmt]
    output.parent.mkdir(parents=True, exist_ok=True)
    image, sample = verify.sample_image(cfg)
    inputs = verify.sample_inputs(image, cfg)

    with staged_path(output) as staged:
        write = trace.export_torchscript if fmt == "torchscript" else trace.export_onnx
        with failed_writes_name(output):  # a full disk names the file the user asked for
            write(student, inputs[0], staged)
        run = verify.load_exported(staged, fmt)
        comparison, skipped = None, None
        if run is None:
            skipped = "onnxruntime is not installed"
        else:
            eager = [trace.detections(student, x) for x in inputs]
            cuts = trace.postprocess_settings(student)
            comparison = verify.compare(
                eager, [run(x) for x in inputs], score_thresh=cuts["score_thresh"],
                max_detections=cuts["max_detections"], sizes=[list(x.shape[1:]) for x in inputs])
            if not comparison.ok:
                raise _mismatch(comparison, output, fmt, sample)

    sidecar = Path(f"{output}.json")
    verify.write_sidecar(sidecar, verify.describe(cfg, student, fmt=fmt, output=output, checkpoint=checkpoint,
                                                  sample=sample, comparison=comparison, skipped=skipped))
    return ExportResult(format=fmt, output=output, sidecar=sidecar,
                        parameters=sum(p.numel() for p in student.parameters()),
                        comparison=comparison, skipped=skipped, seconds=time.perf_counter() - start)


def _mismatch(comparison, output: Path, fmt: str, sample: str) -> LGDError:
    from lgd_cli.export.verify import BOX_ATOL, BOX_RTOL, SCORE_ATOL

    c = comparison
    kept = f"; the earlier {output.name} there is unchanged" if output.exists() else ""
    return LGDError(
        f"the exported {fmt} model disagrees with the eager student on {sample} (sizes {c.sizes}): "
        f"largest box difference {c.max_box_diff:.3g} px (tolerance {BOX_ATOL:g} px + {BOX_RTOL:g} x coordinate), "
        f"largest score difference {c.max_score_diff:.3g} (tolerance {SCORE_ATOL:g}), "
        f"{c.unmatched - c.borderline} detections without a counterpart of the same class and score "
        f"(eager {c.num_eager}, exported {c.num_exported}). {output} was not written{kept}",
        hint="the checkpoint is unaffected and `lgd predict` runs it; please report this export failure")

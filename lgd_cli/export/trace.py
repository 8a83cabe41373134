"""The deployable student of an lgd checkpoint, and its trace through TracingAdapter to TorchScript / ONNX.

The traced input is one image as the caller prepares it (`model_input`): float32 [3, H, W], 0-255,
in cfg.INPUT.FORMAT channel order, already resized; normalisation and padding happen inside the model.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from detectron2.data import transforms as T
from detectron2.export.flatten import TracingAdapter

from lgd_cli.config.build import SavedConfig, build_config
from lgd_cli.engine.checkpoint import read_lgd_checkpoint
from lgd_cli.errors import CheckpointError, LGDError

ONNX_OPSET = 17
OUTPUT_NAMES = ("boxes", "scores", "classes")


def load_student(checkpoint: Path, *, device: str | None = "cpu"):
    """The student detector of an lgd checkpoint alone (teacher and adapter dropped), in eval mode.

    Args:
        checkpoint: a file written by `lgd train`.
        device: where the student runs; None picks CUDA when available.
    Returns:
        (student, cfg): a detectron2 detector (RetinaNet, FCOS, R-CNN) and the frozen config it was built from.
    """
    from lgd_cli.modeling.distiller import build_distiller

    state = read_lgd_checkpoint(checkpoint)
    cfg = build_config(SavedConfig(state["lgd"]["config"], str(checkpoint)), device=device)
    model = build_distiller(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{checkpoint}: its weights do not fit the model its own config builds ({first})",
                              hint="the file may come from another lgd version; re-train or re-export from its run") from None
    return model.student.eval(), cfg


def _postprocessor(student: nn.Module) -> tuple[nn.Module, str]:
    # Dense detectors (RetinaNet, FCOS) hold their test-time cuts; R-CNNs keep them in the box predictor.
    roi_heads = getattr(student, "roi_heads", None)
    if roi_heads is not None:
        return roi_heads.box_predictor, "test_topk_per_image"
    return student, "max_detections_per_image"


def postprocess_settings(student: nn.Module) -> dict:
    """The student's test-time cuts: {"score_thresh", "nms_thresh", "max_detections"}."""
    owner, max_name = _postprocessor(student)
    return {"score_thresh": owner.test_score_thresh, "nms_thresh": owner.test_nms_thresh,
            "max_detections": getattr(owner, max_name)}


def set_score_thresh(student: nn.Module, value: float) -> None:
    """Make the student drop detections scoring below `value` (RetinaNet, FCOS, R-CNNs)."""
    _postprocessor(student)[0].test_score_thresh = value


def category_ids(cfg) -> list[int]:
    """The training json's category id of each class index, or 1-based indices when it is unreadable."""
    names = list(cfg.LGD.CLASS_NAMES)
    try:
        categories = json.loads(Path(cfg.LGD.DATA.TRAIN_JSON).read_text())["categories"]
        ids = sorted(int(cat["id"]) for cat in categories)  # detectron2's contiguous order
    except (OSError, ValueError, KeyError, TypeError):
        ids = []
    return ids if len(ids) == len(names) else list(range(1, len(names) + 1))


def _resize_rule(cfg) -> T.Augmentation:
    """The test-time resize of detectron2's DatasetMapper: shortest edge to MIN_SIZE_TEST, longest <= MAX_SIZE_TEST."""
    return T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST, "choice")


def model_input(image: np.ndarray, cfg) -> Tensor:
    """What the student (eager or exported) takes: (H0, W0, 3) uint8 in cfg.INPUT.FORMAT -> float32 [3, H, W].

    The image is resized by `_resize_rule`; pixel values stay 0-255.
    """
    resized = _resize_rule(cfg).get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)), dtype=torch.float32)


def detections(student: nn.Module, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run the student on one `model_input` image; detections in that image's pixels.

    Returns:
        boxes (N, 4) float32 x1 y1 x2 y2, scores (N,) float32 in decreasing order, classes (N,) int64.
    """
    with torch.no_grad():
        instances = student([{"image": image}])[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def _adapter(student: nn.Module, image: Tensor) -> TracingAdapter:
    return TracingAdapter(student, [{"image": image}], lambda model, inputs: detections(model, inputs[0]["image"])).eval()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def export_torchscript(student: nn.Module, image: Tensor, path: Path) -> None:
    """Trace `student` on `image` ([3, H, W]) and save the TorchScript module to `path`.

    The trace generalises to other H, W (detectron2 traces shapes as tensors); verify.py checks
    that on a second size.
    """
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings list the Python branches the trace fixes (asserts, empty checks), and
        # torch 2.14 calls TorchScript deprecated; the comparison against eager in verify.py is
        # what tells whether the file is right.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_adapter(student, image), (image,), check_trace=False)
    # Through a Python file, so that a failed write is an OSError (the caller names the file).
    with open(path, "wb") as f:
        torch.jit.save(traced, f)
    _fsync(path)


def export_onnx(student: nn.Module, image: Tensor, path: Path) -> None:
    """Export `student` traced on `image` to ONNX (opset 17) with dynamic height and width."""
    count = {name: {0: "detections"} for name in OUTPUT_NAMES}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as in export_torchscript, plus the exporter's own notices
            torch.onnx.export(_adapter(student, image), (image,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image"], output_names=list(OUTPUT_NAMES),
                              dynamic_axes={"image": {1: "height", 2: "width"}, **count})
    except ImportError as exc:
        raise LGDError(f"ONNX export needs the onnx package ({exc})", hint="pip install 'lgd[onnx]'") from None
    _fsync(path)

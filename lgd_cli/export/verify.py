"""Reload an exported student, compare its detections with the eager student, describe it in a JSON sidecar."""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from detectron2.data.detection_utils import read_image

from lgd_cli import __version__
from lgd_cli.files import atomic_write_json
from lgd_cli.export.trace import ONNX_OPSET, OUTPUT_NAMES, category_ids, model_input, postprocess_settings

# Exported and eager detections agree when, for every pair of matched detections:
# |box_exported - box_eager| <= BOX_ATOL + BOX_RTOL * |box_eager| per coordinate (pixels of the input),
# |score_exported - score_eager| <= SCORE_ATOL, and the classes are equal. TorchScript matches
# eager exactly; ONNX Runtime differs by ~1e-5 px (docs/detectron2.md item 9), so these catch real
# export bugs (shifted, rescaled or missing outputs) without failing on float reordering.
BOX_ATOL = 1e-3
BOX_RTOL = 1e-5
SCORE_ATOL = 1e-4

Detections = tuple[Tensor, Tensor, Tensor]  # boxes (N, 4), scores (N,), classes (N,)


@dataclass
class Comparison:
    """How the exported model's detections differ from the eager student's on the sample inputs.

    Args:
        sizes: [H, W] of each input compared.
        num_eager, num_exported: detections per input.
        max_box_diff: largest |difference| of a box coordinate over matched pairs, pixels.
        max_score_diff: largest |difference| of a score over matched pairs.
        boxes_within: every matched box within BOX_ATOL + BOX_RTOL * |box|.
        unmatched: detections without a counterpart of the same class and score (all inputs, both sides).
        borderline: of those, how many score within SCORE_ATOL of a cut (threshold or top-k),
            where float noise may legitimately keep or drop them.
    """

    sizes: list
    num_eager: list
    num_exported: list
    max_box_diff: float = 0.0
    max_score_diff: float = 0.0
    boxes_within: bool = True
    unmatched: int = 0
    borderline: int = 0

    @property
    def ok(self) -> bool:
        return self.boxes_within and self.max_score_diff <= SCORE_ATOL and self.unmatched == self.borderline

    def to_json(self) -> dict:
        return {**asdict(self), "within_tolerance": self.ok}


def tolerances() -> dict:
    return {"box_abs_px": BOX_ATOL, "box_rel": BOX_RTOL, "score_abs": SCORE_ATOL, "classes": "equal",
            "rule": "every detection matched to one of the same class with |box diff| <= box_abs_px + "
                    "box_rel*|box| and |score diff| <= score_abs; unmatched ones only within score_abs of a cut"}


def sample_image(cfg) -> tuple[np.ndarray, str]:
    """The first image of the checkpoint's validation set, else a deterministic synthetic one.

    Returns:
        ((H0, W0, 3) uint8 image in cfg.INPUT.FORMAT, where it came from).
    """
    try:
        data = json.loads(Path(cfg.LGD.DATA.VAL_JSON).read_text())
        path = Path(cfg.LGD.DATA.VAL_IMAGES) / data["images"][0]["file_name"]
        return read_image(str(path), format=cfg.INPUT.FORMAT), str(path)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        side = max(cfg.INPUT.MIN_SIZE_TEST, 32)
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (side, side * 4 // 3, 3), dtype=np.uint8), "synthetic noise (seed 0)"


def sample_inputs(image: np.ndarray, cfg) -> list[Tensor]:
    """The traced input and a second one of another padded size, to catch sizes frozen into the trace."""
    first = model_input(image, cfg)
    return [first, torch.cat([first, first.flip(-1)], dim=-1)]  # the image beside its mirror: width x2


def load_exported(path: Path, fmt: str) -> Callable[[Tensor], Detections] | None:
    """A function running the exported file on one [3, H, W] image, or None for ONNX without onnxruntime."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 calls TorchScript deprecated
            module = torch.jit.load(str(path), map_location="cpu")

        def run(image: Tensor) -> Detections:
            with torch.no_grad():
                return tuple(module(image))

        return run
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(image: Tensor) -> Detections:
        outputs = session.run(list(OUTPUT_NAMES), {"image": image.numpy()})
        return tuple(torch.from_numpy(x) for x in outputs)

    return run


def _match(eager: Detections, exported: Detections) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Pair each eager detection (by decreasing score) with an unpaired exported one of the same class
    and a score within SCORE_ATOL, the nearest box among those.

    Order-free, because equal scores may come out in any order. Returns (pairs, unpaired eager
    indices, unpaired exported indices).
    """
    (eb, es, ec), (xb, xs, xc) = eager, exported
    distance = (eb[:, None].double() - xb[None].double()).abs().amax(-1) if len(eb) and len(xb) else None
    free, pairs, lonely = set(range(len(xb))), [], []
    for i in range(len(eb)):
        candidates = [j for j in free if int(xc[j]) == int(ec[i]) and abs(float(xs[j]) - float(es[i])) <= SCORE_ATOL]
        if not candidates:
            lonely.append(i)
            continue
        j = min(candidates, key=lambda j: float(distance[i, j]))
        free.discard(j)
        pairs.append((i, j))
    return pairs, lonely, sorted(free)


def compare(eager: list[Detections], exported: list[Detections], *, score_thresh: float,
            max_detections: int, sizes: list) -> Comparison:
    """Compare detections input by input; see BOX_ATOL for the rule.

    Args:
        eager, exported: per input, (boxes (N, 4), scores (N,), classes (N,)).
        score_thresh, max_detections: the student's cuts (test_score_thresh, max_detections_per_image).
        sizes: [H, W] of each input (reported only).
    """
    result = Comparison(sizes=sizes, num_eager=[len(e[0]) for e in eager], num_exported=[len(x[0]) for x in exported])
    for e, x in zip(eager, exported):
        pairs, lonely_e, lonely_x = _match(e, x)
        for i, j in pairs:
            diff = (e[0][i].double() - x[0][j].double()).abs()
            result.boxes_within &= bool((diff <= BOX_ATOL + BOX_RTOL * e[0][i].double().abs()).all())
            result.max_box_diff = max(result.max_box_diff, float(diff.max()))
            result.max_score_diff = max(result.max_score_diff, abs(float(e[1][i]) - float(x[1][j])))
        # A detection is cut at the score threshold, or at the top-k when an output is full.
        cut = score_thresh
        if max(len(e[1]), len(x[1])) >= max_detections:
            cut = max(cut, min(float(s[1].min()) for s in (e, x) if len(s[1])))
        for side, lonely in ((e, lonely_e), (x, lonely_x)):
            result.unmatched += len(lonely)
            result.borderline += sum(float(side[1][k]) <= cut + SCORE_ATOL for k in lonely)
    return result


def describe(cfg, student, *, fmt: str, output: Path, checkpoint: Path, sample: str,
             comparison: Comparison | None, skipped: str | None) -> dict:
    """The JSON sidecar: everything a deployment needs to feed the file and read its outputs."""
    mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
    sidecar = {
        "format": fmt,
        "file": output.name,
        "checkpoint": str(Path(checkpoint).resolve()),
        "preset": cfg.LGD.PRESET,
        "detector": cfg.MODEL.META_ARCHITECTURE,
        "lgd_version": __version__,
        "classes": list(cfg.LGD.CLASS_NAMES),
        "category_ids": category_ids(cfg),
        "input": {
            "name": "image", "shape": [3, "H", "W"], "dtype": "float32", "channel_order": cfg.INPUT.FORMAT,
            "value_range": [0, 255],
            "resize": {"rule": "scale so the shorter edge is min_size unless the longer edge would exceed "
                               "max_size, then so the longer edge is max_size; bilinear; done by the caller",
                       "min_size": cfg.INPUT.MIN_SIZE_TEST, "max_size": cfg.INPUT.MAX_SIZE_TEST},
            "normalisation": "inside the model: (image - pixel_mean) / pixel_std per channel, in channel_order",
            "pixel_mean": mean, "pixel_std": std,
            "padding": f"inside the model, to a multiple of {student.backbone.size_divisibility}",
        },
        "outputs": {
            "boxes": "[N, 4] float32 x1, y1, x2, y2 in input pixels; divide by the resize scale for the original image",
            "scores": "[N] float32, decreasing",
            "classes": "[N] int64 index into classes (category_ids gives the dataset's id)",
        },
        "postprocess": postprocess_settings(student),
        "verification": {
            "checked": comparison is not None, "skipped_because": skipped, "sample": sample,
            "tolerances": tolerances(), **(comparison.to_json() if comparison is not None else {}),
        },
    }
    if fmt == "onnx":
        sidecar["opset"] = ONNX_OPSET
    return sidecar


def write_sidecar(path: Path, sidecar: dict) -> None:
    atomic_write_json(path, sidecar)

"""MODEL.WEIGHTS from a local file, checked against the model before anything is loaded.

Accepted: detectron2 / MSRA / FAIR `.pkl` (detectron2's Caffe2 renames and suffix matching), torchvision
ResNet / ResNeXt `.pth` (renamed here), the output of `lgd convert-swin-weights`, and any `.pth` holding
the detector's own keys. Every `.pth` is read with weights_only=True, every `.pkl` by a restricted unpickler.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor, nn

from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names

from lgd_cli.modeling.weight_files import SafeDetectionCheckpointer, read_checkpoint
from lgd_cli.errors import CheckpointError

logger = logging.getLogger(__name__)

D2_URL = "https://dl.fbaipublicfiles.com/detectron2/"
# What torchvision's ImageNet ResNets expect, in detectron2's terms (0-255 input: mean and std × 255).
TORCHVISION_INPUT = {"INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
                     "MODEL.PIXEL_STD": [58.395, 57.12, 57.375], "MODEL.RESNETS.STRIDE_IN_1X1": False}
# Backbone tensors ImageNet weights never hold: DCN offset convs (init zero), Swin's per-stage output norms.
_FRESH = re.compile(r"(\.conv2_offset\.|^backbone\.bottom_up\.norm\d+\.)")
# An ImageNet classifier (torchvision fc, Caffe2 fc1000 after detectron2's renames): never part of a detector.
_CLASSIFIER = re.compile(r"(fc\d*|head)\.(weight|bias)$")


@dataclass
class WeightsReport:
    """What `load_pretrained_weights` did (model keys are the detector's state-dict names)."""

    path: Path
    source: str  # "detectron2 .pkl", "Caffe2 .pkl", "torchvision ResNet", "lgd Swin", "state dict"
    loaded: list[str] = field(default_factory=list)  # model keys set from the file
    missing: list[str] = field(default_factory=list)  # bottom-up keys left at initialisation (unexpectedly)
    fresh: list[str] = field(default_factory=list)  # bottom-up keys no ImageNet file has (DCN offsets, Swin norms)
    unexpected: list[str] = field(default_factory=list)  # file keys no model key took
    dropped: list[str] = field(default_factory=list)  # file keys ignored on purpose (classifier, BN counters)
    other_shape: list[str] = field(default_factory=list)  # model keys outside the backbone left as they were


def resolve_weights_path(weights: str) -> Path:
    """The local file MODEL.WEIGHTS names: a path, or a URL / detectron2:// already in detectron2's download cache."""
    if "://" in weights:
        url = D2_URL + weights[len("detectron2://"):] if weights.startswith("detectron2://") else weights
        cache = Path(os.path.expanduser(os.getenv("FVCORE_CACHE", "~/.torch/iopath_cache")))
        cached = cache / os.path.dirname(urlparse(url).path.lstrip("/")) / url.split("/")[-1]
        if cached.is_file():
            return cached
        name = url.split("/")[-1]
        raise CheckpointError(f"MODEL.WEIGHTS {weights} is a URL, and lgd reads weights from local files only",
                              hint=f"download {url} elsewhere and pass --set MODEL.WEIGHTS=path/to/{name}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file {path} (MODEL.WEIGHTS) does not exist",
                              hint="pass an existing file with --set MODEL.WEIGHTS=path, or MODEL.WEIGHTS= for "
                              "random initialisation")
    return path


def torchvision_resnet_to_detectron2(state: dict) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """torchvision ResNet/ResNeXt keys -> detectron2 ResNet keys (under backbone.bottom_up.).

    Returns:
        (renamed tensors, dropped keys (classifier, BN step counters), keys no rule knows).
    """
    renamed, dropped, unknown = {}, [], []
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or key.startswith("fc."):
            dropped.append(key)
            continue
        if m := re.fullmatch(r"conv1\.weight", key):
            name = "stem.conv1.weight"
        elif m := re.fullmatch(r"bn1\.(\w+)", key):
            name = f"stem.conv1.norm.{m[1]}"
        elif m := re.fullmatch(r"layer(\d)\.(\d+)\.conv(\d)\.weight", key):
            name = f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"
        elif m := re.fullmatch(r"layer(\d)\.(\d+)\.bn(\d)\.(\w+)", key):
            name = f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"
        elif m := re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.0\.weight", key):  # the projection shortcut
            name = f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"
        elif m := re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.1\.(\w+)", key):
            name = f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"
        else:
            unknown.append(key)
            continue
        renamed["backbone.bottom_up." + name] = value
    return renamed, dropped, unknown


def _is_torchvision_resnet(state: dict) -> bool:
    return {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight"} <= set(state)


def _is_raw_swin(state: dict) -> bool:
    return any(re.match(r"(backbone\.)?(layers|stages)\.\d+\.blocks\.", k) for k in state)


def _check_torchvision_config(path: Path, cfg) -> None:
    # torchvision's weights compute the right thing only on their own input and block layout.
    actual = {"INPUT.FORMAT": cfg.INPUT.FORMAT, "MODEL.PIXEL_MEAN": list(cfg.MODEL.PIXEL_MEAN),
              "MODEL.PIXEL_STD": list(cfg.MODEL.PIXEL_STD), "MODEL.RESNETS.STRIDE_IN_1X1": cfg.MODEL.RESNETS.STRIDE_IN_1X1}
    wrong = []
    for key, expected in TORCHVISION_INPUT.items():
        if isinstance(expected, list):
            same = len(actual[key]) == len(expected) and all(abs(a - e) < 1e-3 for a, e in zip(actual[key], expected))
        else:
            same = actual[key] == expected
        if not same:
            wrong.append(key)
    if cfg.MODEL.RESNETS.NORM not in ("FrozenBN", "BN", "SyncBN", "naiveSyncBN", "nnSyncBN"):
        raise CheckpointError(f"{path} holds torchvision ResNet weights with BatchNorm statistics, but "
                              f"MODEL.RESNETS.NORM is {cfg.MODEL.RESNETS.NORM}",
                              hint="use MODEL.RESNETS.NORM=FrozenBN (or BN)")
    if wrong:
        pairs = " ".join(f"--set {k}={_literal(TORCHVISION_INPUT[k])}" for k in wrong)
        raise CheckpointError(f"{path} holds torchvision ResNet weights: they expect RGB input scaled to 0-1 and "
                              "normalised by the ImageNet mean/std, and the stride in the 3x3 conv; this config "
                              f"differs in {', '.join(wrong)}", hint=f"add {pairs}")


def _literal(value) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def _check_swin_config(path: Path, arch: dict, cfg) -> None:
    s = cfg.MODEL.SWINT
    ours = {"embed_dim": s.EMBED_DIM, "depths": list(s.DEPTHS), "num_heads": list(s.NUM_HEADS), "window_size": s.WINDOW_SIZE}
    theirs = {k: arch.get(k) for k in ours}
    if ours != theirs:
        pairs = " ".join(f"--set MODEL.SWINT.{k.upper()}={_literal(v)}" for k, v in theirs.items() if ours[k] != v)
        raise CheckpointError(f"{path} holds a Swin of {theirs}, but MODEL.SWINT builds {ours}", hint=f"add {pairs}")


def read_weights(path: Path, model: nn.Module, cfg) -> tuple[dict[str, Tensor], str, bool, list[str], list[str]]:
    """Read a weights file into detector-named tensors.

    Returns:
        (tensors, source description, match by name suffix (detectron2's heuristics), dropped keys, unknown keys).
    """
    if path.suffix == ".pkl":
        data = SafeDetectionCheckpointer(model)._load_file(str(path))  # restricted unpickling first
        state = {k: torch.as_tensor(v) for k, v in data["model"].items() if isinstance(v, (np.ndarray, Tensor))}
        heuristics = bool(data.get("matching_heuristics", False))
        if data.get("__author__") == "Caffe2":
            state, _ = convert_c2_detectron_names(state)
            return state, "Caffe2 .pkl", True, [], []
        return state, "detectron2 .pkl", heuristics, [], []
    data = read_checkpoint(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a weights file (it holds a {type(data).__name__})")
    state = data.get("model", data.get("state_dict", data))
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a weights file: expected a dict of tensors (optionally under 'model')")
    if _is_torchvision_resnet(state):
        _check_torchvision_config(path, cfg)
        state, dropped, unknown = torchvision_resnet_to_detectron2(state)
        return state, "torchvision ResNet", False, dropped, unknown
    if _is_raw_swin(state):
        raise CheckpointError(f"{path} is a Swin ImageNet checkpoint in its original layout",
                              hint=f"convert it once: lgd convert-swin-weights {path}, then pass the output "
                              "as MODEL.WEIGHTS")
    if "lgd" in data:  # a checkpoint of `lgd train`: start from its student
        state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
        return state, "lgd checkpoint (student)", False, [], []
    if "swin" in data:
        _check_swin_config(path, data["swin"], cfg)
        return state, "lgd Swin", bool(data.get("matching_heuristics", False)), [], []
    return state, "state dict", bool(data.get("matching_heuristics", False)), [], []


def match_keys(model_keys: list[str], file_keys: list[str], by_suffix: bool) -> dict[str, str]:
    """Model key -> file key: equal names, or (by_suffix) the longest file key the model key ends with after a '.'.

    Raises ValueError when one file key would fill two model tensors.
    """
    if not by_suffix:
        present = set(file_keys)
        return {k: k for k in model_keys if k in present}
    matched: dict[str, str] = {}
    for model_key in model_keys:
        candidates = [f for f in file_keys if model_key == f or model_key.endswith("." + f)]
        if candidates:
            matched[model_key] = max(candidates, key=len)
    taken: dict[str, str] = {}
    for model_key, file_key in matched.items():
        if file_key in taken:
            raise ValueError(f"{file_key} matches both {taken[file_key]} and {model_key}")
        taken[file_key] = model_key
    return matched


def load_pretrained_weights(model: nn.Module, cfg, weights: str | None = None) -> WeightsReport:
    """Load MODEL.WEIGHTS (or `weights`) into a detector, refusing files that do not fit its backbone.

    Args:
        model: the detector (the distiller's student), backbone at `model.backbone`.
        cfg: its config (input format and Swin/ResNet keys are checked against the file).
        weights: overrides cfg.MODEL.WEIGHTS.

    Returns:
        The report; also logged (missing and unexpected tensors as warnings).
    """
    path = resolve_weights_path(weights if weights is not None else cfg.MODEL.WEIGHTS)
    state, source, by_suffix, dropped, unknown = read_weights(path, model, cfg)
    model_state = model.state_dict()
    try:
        matched = match_keys(list(model_state), list(state), by_suffix)
    except ValueError as exc:
        raise CheckpointError(f"{path} is ambiguous for this model: {exc}") from None
    backbone = getattr(model, "backbone", None)
    trunk = getattr(backbone, "bottom_up", backbone)  # the ResNet / Swin inside the FPN
    bottom_up = "backbone.bottom_up." if trunk is not backbone else "backbone."
    backbone_name = type(trunk).__name__
    taken = set(matched.values())
    wrong = [(m, f) for m, f in matched.items() if model_state[m].shape != state[f].shape]
    # Outside the backbone a different shape is expected (a detector head with another class count):
    # those tensors keep their initialisation. In the backbone it means another architecture.
    skipped = [m for m, _ in wrong if not m.startswith(bottom_up)]
    wrong = [(m, f) for m, f in wrong if m.startswith(bottom_up)]
    matched = {m: f for m, f in matched.items() if m not in skipped}
    if wrong:
        m, f = wrong[0]
        raise CheckpointError(f"{path} does not fit the model: {len(wrong)} tensors differ in shape, e.g. {f} is "
                              f"{tuple(state[f].shape)} in the file, {m} is {tuple(model_state[m].shape)} in the "
                              f"{backbone_name} model", hint="the file is for another architecture: check "
                              "MODEL.RESNETS.DEPTH / NUM_GROUPS / WIDTH_PER_GROUP or MODEL.SWINT.* against it")
    if not any(m.startswith(bottom_up) for m in matched):
        raise CheckpointError(f"no tensor in {path} ({source}, {len(state)} tensors, e.g. {next(iter(state), 'none')}) "
                              f"matches the {backbone_name} backbone of this model",
                              hint="pass weights of this backbone (a detectron2 .pkl such as R-50.pkl, downloaded "
                              "elsewhere, a torchvision ResNet .pth, or the output of `lgd convert-swin-weights`) "
                              "with --set MODEL.WEIGHTS=path")
    incompatible = model.load_state_dict({m: state[f] for m, f in matched.items()}, strict=False)
    left = [k for k in incompatible.missing_keys if k.startswith(bottom_up) and not k.endswith("num_batches_tracked")]
    unused = [k for k in state if k not in taken] + unknown
    report = WeightsReport(
        path=path, source=source, loaded=sorted(matched),
        missing=[k for k in left if not _FRESH.search(k)], fresh=[k for k in left if _FRESH.search(k)],
        unexpected=[k for k in unused if not _CLASSIFIER.match(k)],
        dropped=dropped + [k for k in unused if _CLASSIFIER.match(k)], other_shape=skipped)
    _log(report)
    return report


def _log(report: WeightsReport) -> None:
    logger.info(f"MODEL.WEIGHTS {report.path} ({report.source}): {len(report.loaded)} tensors loaded, "
                f"{len(report.fresh)} backbone tensors initialised fresh (no ImageNet counterpart), "
                f"{len(report.dropped)} file entries dropped (classifier, BN counters)")
    if report.missing:
        logger.warning(f"{len(report.missing)} backbone tensors are not in {report.path} and keep their random "
                       f"initialisation: {', '.join(report.missing[:5])}{' ...' if len(report.missing) > 5 else ''}")
    if report.other_shape:
        logger.warning(f"{len(report.other_shape)} tensors outside the backbone have another shape in {report.path} "
                       f"and keep their initialisation: {', '.join(report.other_shape[:5])}"
                       f"{' ...' if len(report.other_shape) > 5 else ''}")
    if report.unexpected:
        logger.warning(f"{len(report.unexpected)} tensors of {report.path} fit nothing in the model: "
                       f"{', '.join(report.unexpected[:5])}{' ...' if len(report.unexpected) > 5 else ''}")

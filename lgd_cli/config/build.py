"""build_config(): the only place an lgd config is assembled, checked and frozen."""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Sequence

from detectron2.config import CfgNode, get_cfg

from lgd_cli.config.defaults import add_lgd_config
from lgd_cli.data.datasets import TRAIN_DATASET, VAL_DATASET
from lgd_cli.config.presets import resolve_preset
from lgd_cli.errors import ConfigError
from lgd_cli.modeling.lgd import BOX_CLAMPS, CELL_MAPPINGS, EMPTY_IMAGE_RULES
from lgd_cli.modeling.students.dense import LOSS_NORMALIZER_RULES

# Top-level SOLVER keys that the two-optimiser recipe ignores (docs/method.md §7): setting
# one is almost certainly meant for the student or teacher block.
_IGNORED_SOLVER_KEYS = {"BASE_LR", "STEPS", "GAMMA", "MOMENTUM", "NESTEROV", "WEIGHT_DECAY",
                        "WARMUP_FACTOR", "WARMUP_ITERS", "WARMUP_METHOD", "LR_SCHEDULER_NAME"}


def base_config() -> CfgNode:
    cfg = get_cfg()
    add_lgd_config(cfg)
    return cfg


def _flat_keys(node: CfgNode, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        keys.extend(_flat_keys(value, full + ".") if isinstance(value, CfgNode) else [full])
    return keys


def parse_overrides(cfg: CfgNode, overrides: Sequence[str]) -> list[str]:
    """`KEY=VALUE` strings -> the flat [KEY, VALUE, ...] list merge_from_list takes, keys checked."""
    known = _flat_keys(cfg)
    flat = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set '{item}' is not KEY=VALUE", hint="e.g. --set MODEL.DISTILLATOR.LAMBDA=0.5")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            raise ConfigError(f"unknown config key '{key}'",
                              hint=f"closest keys: {', '.join(close)}" if close else "see config.yaml of a run for all keys")
        if key.startswith("SOLVER.") and key.split(".", 1)[1] in _IGNORED_SOLVER_KEYS:
            block_key = key.split(".", 1)[1]
            raise ConfigError(
                f"{key} is not read: LGD trains two optimisers, each with its own solver block",
                hint=f"set MODEL.DISTILLATOR.STUDENT.SOLVER.{block_key} and/or MODEL.DISTILLATOR.TEACHER.SOLVER.{block_key}")
        flat.extend([key, value])
    return flat


def _merge_list(cfg: CfgNode, flat: list[str]) -> None:
    try:
        cfg.merge_from_list(flat)
    except (ValueError, AssertionError, KeyError) as exc:
        raise ConfigError(f"bad --set value: {exc}") from None


_DERIVED_KEYS = {f"MODEL.DISTILLATOR.{k}" for k in (
    "PRE_NONDISTILL_ITERS", "POST_NONDISTILL_ITERS", "PRE_FREEZE_STUDENT_BACKBONE_ITERS",
    "STUDENT.SOLVER.STEPS", "TEACHER.SOLVER.STEPS", "STUDENT.SOLVER.WARMUP_ITERS", "TEACHER.SOLVER.WARMUP_ITERS")}


def _apply_relative_schedule(cfg: CfgNode) -> None:
    rel = cfg.LGD.RELATIVE_SCHEDULE
    total = cfg.SOLVER.MAX_ITER
    d = cfg.MODEL.DISTILLATOR
    d.PRE_NONDISTILL_ITERS = int(round(rel.PRE_NONDISTILL * total))
    d.POST_NONDISTILL_ITERS = int(round(rel.POST_NONDISTILL * total))
    d.PRE_FREEZE_STUDENT_BACKBONE_ITERS = int(round(rel.PRE_FREEZE_BACKBONE * total))
    for block in (d.STUDENT.SOLVER, d.TEACHER.SOLVER):
        # fvcore's schedule refuses a milestone at MAX_ITER itself (tiny --iters round up to it).
        block.STEPS = tuple(s for s in (int(round(f * total)) for f in rel.STEPS) if s < total)
        block.WARMUP_ITERS = max(1, int(round(rel.WARMUP * total)))
    if cfg.SOLVER.CHECKPOINT_PERIOD > total:
        cfg.SOLVER.CHECKPOINT_PERIOD = total


def _set_num_classes(cfg: CfgNode, num_classes: int) -> None:
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.FCOS.NUM_CLASSES = num_classes


def resolve_data(cfg: CfgNode) -> None:
    """Fill LGD.DATA paths, DATASETS and the class names from the data source (in place)."""
    from lgd_cli.data import datasets
    from lgd_cli.data.validate import read_class_names

    data = cfg.LGD.DATA
    if data.SOURCE == "synthetic":
        paths = datasets.synthetic_paths()
        data.TRAIN_JSON, data.TRAIN_IMAGES = str(paths.train_json), str(paths.train_images)
        data.VAL_JSON, data.VAL_IMAGES = str(paths.val_json), str(paths.val_images)
    elif data.SOURCE == "coco":
        train_json, train_images, val_json, val_images = datasets.coco_paths(Path(data.ROOT))
        data.TRAIN_JSON, data.TRAIN_IMAGES = str(train_json), str(train_images)
        data.VAL_JSON, data.VAL_IMAGES = str(val_json), str(val_images)
    elif data.SOURCE == "custom":
        missing = [k for k in ("TRAIN_JSON", "TRAIN_IMAGES", "VAL_JSON", "VAL_IMAGES") if not data[k]]
        if missing:
            raise ConfigError("a custom dataset needs --train-json, --train-images, --val-json and --val-images",
                              hint=f"missing: {', '.join('LGD.DATA.' + k for k in missing)}")
    else:
        raise ConfigError(f"LGD.DATA.SOURCE must be synthetic, coco or custom, not '{data.SOURCE}'")
    names = read_class_names(Path(data.TRAIN_JSON))
    cfg.LGD.CLASS_NAMES = list(names)
    _set_num_classes(cfg, len(names))
    cfg.DATASETS.TRAIN = (TRAIN_DATASET,)
    cfg.DATASETS.TEST = (VAL_DATASET,)


def _resolve_device(cfg: CfgNode, device: str | None) -> None:
    import torch

    if device is None:
        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but no CUDA device is visible", hint="use --device cpu")
    else:
        cfg.MODEL.DEVICE = device


# lgd's choices where it departs from the official code: the first value is the official rule.
_OPTION_VALUES = {
    "LABEL_ENCODER.BOX_CLAMP": BOX_CLAMPS,
    "LABEL_ENCODER.EMPTY_IMAGE": EMPTY_IMAGE_RULES,
    "TEACHER.CELL_MAPPING": CELL_MAPPINGS,
    "TEACHER.LOSS_NORMALIZER": LOSS_NORMALIZER_RULES,
}


def _check(cfg: CfgNode) -> None:
    if cfg.SOLVER.MAX_ITER <= 0:
        raise ConfigError(f"SOLVER.MAX_ITER (--iters) must be positive, got {cfg.SOLVER.MAX_ITER}")
    d = cfg.MODEL.DISTILLATOR
    for block in ("STUDENT", "TEACHER"):
        solver = d[block].SOLVER
        if solver.OPTIMIZER.upper() not in ("SGD", "ADAMW"):
            raise ConfigError(f"MODEL.DISTILLATOR.{block}.SOLVER.OPTIMIZER must be SGD or AdamW, not {solver.OPTIMIZER}")
        if solver.AMP.ENABLED:
            raise ConfigError(f"MODEL.DISTILLATOR.{block}.SOLVER.AMP.ENABLED is not read by lgd (key parity only)",
                              hint="mixed precision of both optimisers is SOLVER.AMP.ENABLED=True (SOLVER.AMP.DTYPE)")
    from lgd_cli.engine.amp import DTYPES

    if cfg.SOLVER.AMP.DTYPE.lower() not in DTYPES:
        raise ConfigError(f"SOLVER.AMP.DTYPE must be bfloat16 or float16, not '{cfg.SOLVER.AMP.DTYPE}'")
    if d.TEACHER.INTERACT_PATTERN not in ("stuGuided", "labelGuided", "student_fill", "teacher_fill"):
        raise ConfigError(f"unknown MODEL.DISTILLATOR.TEACHER.INTERACT_PATTERN '{d.TEACHER.INTERACT_PATTERN}'",
                          hint="one of stuGuided, labelGuided, student_fill, teacher_fill")
    if d.DISTILL_GATE not in ("always", "teacher_better"):
        raise ConfigError(f"unknown MODEL.DISTILLATOR.DISTILL_GATE '{d.DISTILL_GATE}'", hint="one of always, teacher_better")
    if cfg.LGD.SKIP_NONFINITE < 0:
        raise ConfigError(f"LGD.SKIP_NONFINITE (--skip-nonfinite) must be 0 or more, got {cfg.LGD.SKIP_NONFINITE}")
    if cfg.LGD.DATA.BAD_BOXES not in ("clip", "drop", "error"):
        raise ConfigError(f"--bad-boxes (LGD.DATA.BAD_BOXES) must be clip, drop or error, not '{cfg.LGD.DATA.BAD_BOXES}'")
    if d.LABEL_ENCODER.CATEGORY_FORMAT not in ("one_hot", "norm_classes"):
        raise ConfigError("MODEL.DISTILLATOR.LABEL_ENCODER.CATEGORY_FORMAT must be one_hot or norm_classes")
    for key, allowed in _OPTION_VALUES.items():
        block, name = key.rsplit(".", 1)
        value = d[block][name]
        if value not in allowed:
            raise ConfigError(f"MODEL.DISTILLATOR.{key} must be {' or '.join(allowed)}, not '{value}'",
                              hint="see docs/method.md, 'Differences from the official code'")
    channels = cfg.MODEL.FPN.OUT_CHANNELS
    if d.ENABLED and channels % d.TEACHER.NR_TRANSFORMER_HEADS:
        raise ConfigError(f"MODEL.FPN.OUT_CHANNELS ({channels}) must be divisible by "
                          f"MODEL.DISTILLATOR.TEACHER.NR_TRANSFORMER_HEADS ({d.TEACHER.NR_TRANSFORMER_HEADS})")
    if not math.isfinite(d.LAMBDA) or d.LAMBDA < 0:
        raise ConfigError(f"MODEL.DISTILLATOR.LAMBDA must be a finite number >= 0, got {d.LAMBDA}")


def build_config(preset: str = "demo", overrides: Sequence[str] = (), *, device: str | None = None,
                 resolve_dataset: bool = True) -> CfgNode:
    """Assemble a frozen config: defaults + preset + `--set` overrides + what the data determines.

    Args:
        preset: a preset name (see `lgd presets`) or a path to a YAML file.
        overrides: `KEY=VALUE` strings, applied in order (the last word wins).
        device: "cpu", "cuda", "cuda:1"...; None picks CUDA when available.
        resolve_dataset: fill dataset paths and class names (False only for model-only uses).
    """
    cfg = base_config()
    path = resolve_preset(preset)
    try:
        cfg.merge_from_file(str(path))
    except (KeyError, ValueError, AssertionError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg.LGD.PRESET = path.stem
    flat = parse_overrides(cfg, overrides)
    _merge_list(cfg, flat)
    if cfg.LGD.RELATIVE_SCHEDULE.ENABLED:
        _apply_relative_schedule(cfg)
        # An iteration key the user set explicitly wins over the fraction it derives from.
        pairs = list(zip(flat[::2], flat[1::2]))
        _merge_list(cfg, [x for key, value in pairs if key in _DERIVED_KEYS for x in (key, value)])
    _resolve_device(cfg, device)
    if resolve_dataset:
        resolve_data(cfg)
    _check(cfg)
    cfg.freeze()
    return cfg


# What lgd computed before the _OPTION_VALUES keys existed: a checkpoint whose config lacks one
# was trained with this rule, so its teacher is rebuilt with it.
_RULES_BEFORE_OPTION_KEYS = {
    "LABEL_ENCODER.BOX_CLAMP": "image",
    "LABEL_ENCODER.EMPTY_IMAGE": "context",
    "TEACHER.CELL_MAPPING": "stride",
    "TEACHER.LOSS_NORMALIZER": "per_step",
}


def config_from_checkpoint_yaml(text: str, overrides: Sequence[str] = (), *, device: str | None = None) -> CfgNode:
    """Rebuild the frozen config embedded in a checkpoint, then apply `--set` overrides."""
    cfg = base_config()
    saved = CfgNode.load_cfg(text)
    cfg.merge_from_other_cfg(saved)
    saved_d = saved.get("MODEL", CfgNode()).get("DISTILLATOR", CfgNode())
    for key, value in _RULES_BEFORE_OPTION_KEYS.items():
        block, name = key.split(".")
        if name not in saved_d.get(block, CfgNode()):
            cfg.MODEL.DISTILLATOR[block][name] = value
    _merge_list(cfg, parse_overrides(cfg, overrides))
    _resolve_device(cfg, device)
    cfg.freeze()
    return cfg

"""build_config(): the only place an lgd config is assembled, checked and frozen."""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml
from detectron2.config import CfgNode, get_cfg

from lgd_cli.config.choices import CHOICES, DATA_SOURCES, OPTION_OF_KEY
from lgd_cli.config.defaults import IGNORED_SOLVER_KEYS, add_lgd_config
from lgd_cli.data.datasets import TRAIN_DATASET, VAL_DATASET
from lgd_cli.config.presets import resolve_preset
from lgd_cli.errors import ConfigError


@dataclass(frozen=True)
class SavedConfig:
    """A config lgd built before, as YAML text: a checkpoint's embedded `lgd.config`, a run's config.yaml.

    Args:
        text: the YAML (CfgNode.dump()).
        origin: where it came from, for messages (e.g. the checkpoint's path).
    """

    text: str
    origin: str = "saved config"

    @classmethod
    def of(cls, cfg: CfgNode, origin: str = "saved config") -> "SavedConfig":
        return cls(cfg.dump(), origin)


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


def parse_overrides(cfg: CfgNode, overrides: Sequence[str]) -> list[tuple[str, str]]:
    """`KEY=VALUE` strings -> (KEY, VALUE) pairs, each key checked against `cfg`."""
    known = _flat_keys(cfg)
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set '{item}' is not KEY=VALUE", hint="e.g. --set MODEL.DISTILLATOR.LAMBDA=0.5")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            raise ConfigError(f"unknown config key '{key}'",
                              hint=f"closest keys: {', '.join(close)}" if close else "see config.yaml of a run for all keys")
        if key.startswith("SOLVER.") and key.split(".", 1)[1] in IGNORED_SOLVER_KEYS:
            block_key = key.split(".", 1)[1]
            raise ConfigError(
                f"{key} is not read: LGD trains two optimisers, each with its own solver block",
                hint=f"set MODEL.DISTILLATOR.STUDENT.SOLVER.{block_key} and/or MODEL.DISTILLATOR.TEACHER.SOLVER.{block_key}")
        pairs.append((key, value))
    return pairs


def _expected_type(original) -> str:
    if isinstance(original, bool):
        return "True or False"
    if isinstance(original, int):
        return "an integer"
    if isinstance(original, float):
        return "a number"
    if isinstance(original, (list, tuple)):
        return "a list"
    return "a string"


def _merge_pairs(cfg: CfgNode, pairs: Sequence[tuple[str, str]]) -> None:
    """Merge (KEY, VALUE text) pairs; a value of the wrong type is a ConfigError naming the type the key takes."""
    for key, text in pairs:
        value = CfgNode._decode_cfg_value(text)  # yacs' own reading: a Python literal, else the text
        node = cfg
        for part in key.split(".")[:-1]:
            node = node[part]
        original = node[key.rsplit(".", 1)[-1]]
        # An integer is a number: yacs alone would refuse LAMBDA=1 for a float key. Otherwise the
        # text goes to yacs as given (decoding it twice would unquote '123' into a number).
        if isinstance(original, float) and isinstance(value, int) and not isinstance(value, bool):
            text_or_value = float(value)
        else:
            text_or_value = text
        try:
            cfg.merge_from_list([key, text_or_value])
        except ValueError as exc:
            if "Type mismatch" not in str(exc):
                raise ConfigError(f"bad --set value {key}={text}: {exc}") from None
            hint = f"it is now {original!r}"
            if isinstance(original, str):
                hint += f"; quote a text that reads as a number or list: --set \"{key}='{text}'\""
            raise ConfigError(f"{key} expects {_expected_type(original)}, got '{text}'", hint=hint) from None
        except (AssertionError, KeyError) as exc:
            raise ConfigError(f"bad --set value {key}={text}: {exc}") from None


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
        raise ConfigError(f"LGD.DATA.SOURCE must be {_alternatives(DATA_SOURCES)}, not '{data.SOURCE}'")
    names = read_class_names(Path(data.TRAIN_JSON))
    cfg.LGD.CLASS_NAMES = list(names)
    _set_num_classes(cfg, len(names))
    cfg.DATASETS.TRAIN = (TRAIN_DATASET,)
    cfg.DATASETS.TEST = (VAL_DATASET,)


_DEVICE_NAME = re.compile(r"cpu|cuda(?::(\d+))?")


def _resolve_device(cfg: CfgNode, device: str | None) -> None:
    import torch

    if device is None:
        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
        return
    name = _DEVICE_NAME.fullmatch(device)
    if name is None:
        raise ConfigError(f"unknown device '{device}'", hint="cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} asked for, but no CUDA device is visible", hint="use --device cpu")
        count = torch.cuda.device_count()
        if name.group(1) is not None and int(name.group(1)) >= count:
            visible = f"only {count} CUDA device is" if count == 1 else f"only {count} CUDA devices are"
            raise ConfigError(f"--device {device} asked for, but {visible} visible",
                              hint="cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}")
    cfg.MODEL.DEVICE = device


def _alternatives(values: Sequence[str]) -> str:
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def _check_choices(cfg: CfgNode) -> None:
    for key, choice in CHOICES.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        value = node
        if choice.any_case:
            accepted = isinstance(value, str) and value.lower() in {v.lower() for v in choice.values}
        else:
            accepted = value in choice.values
        if not accepted:
            name = f"{OPTION_OF_KEY[key]} ({key})" if key in OPTION_OF_KEY else key
            raise ConfigError(f"{name} must be {_alternatives(choice.shown)}, not '{value}'", hint=choice.hint)


def _check(cfg: CfgNode) -> None:
    if cfg.SOLVER.MAX_ITER <= 0:
        raise ConfigError(f"SOLVER.MAX_ITER (--iters) must be positive, got {cfg.SOLVER.MAX_ITER}")
    _check_choices(cfg)
    d = cfg.MODEL.DISTILLATOR
    for block in ("STUDENT", "TEACHER"):
        if d[block].SOLVER.AMP.ENABLED:
            raise ConfigError(f"MODEL.DISTILLATOR.{block}.SOLVER.AMP.ENABLED is not read by lgd (key parity only)",
                              hint="mixed precision of both optimisers is SOLVER.AMP.ENABLED=True (SOLVER.AMP.DTYPE)")
    if cfg.LGD.SKIP_NONFINITE < 0:
        raise ConfigError(f"LGD.SKIP_NONFINITE (--skip-nonfinite) must be 0 or more, got {cfg.LGD.SKIP_NONFINITE}")
    if cfg.LGD.LOG_PERIOD < 1:
        raise ConfigError(f"LGD.LOG_PERIOD must be 1 or more, got {cfg.LGD.LOG_PERIOD}")
    channels = cfg.MODEL.FPN.OUT_CHANNELS
    if d.ENABLED and channels % d.TEACHER.NR_TRANSFORMER_HEADS:
        raise ConfigError(f"MODEL.FPN.OUT_CHANNELS ({channels}) must be divisible by "
                          f"MODEL.DISTILLATOR.TEACHER.NR_TRANSFORMER_HEADS ({d.TEACHER.NR_TRANSFORMER_HEADS})")
    if not math.isfinite(d.LAMBDA) or d.LAMBDA < 0:
        raise ConfigError(f"MODEL.DISTILLATOR.LAMBDA must be a finite number >= 0, got {d.LAMBDA}")


# What lgd computed before the option keys (BOX_CLAMP ... LOSS_NORMALIZER) existed: a saved config
# that lacks one was trained with this rule, so its teacher is rebuilt with it.
_RULES_BEFORE_OPTION_KEYS = {
    "LABEL_ENCODER.BOX_CLAMP": "image",
    "LABEL_ENCODER.EMPTY_IMAGE": "context",
    "TEACHER.CELL_MAPPING": "stride",
    "TEACHER.LOSS_NORMALIZER": "per_step",
}


def _merge_saved(cfg: CfgNode, source: SavedConfig) -> None:
    try:
        saved = CfgNode.load_cfg(source.text)
        cfg.merge_from_other_cfg(saved)
    except (KeyError, ValueError, AssertionError, yaml.YAMLError) as exc:
        raise ConfigError(f"{source.origin}: its config does not fit this lgd version ({exc})",
                          hint="it may come from another lgd version") from None
    saved_d = saved.get("MODEL", CfgNode()).get("DISTILLATOR", CfgNode())
    for key, value in _RULES_BEFORE_OPTION_KEYS.items():
        block, name = key.split(".")
        if name not in saved_d.get(block, CfgNode()):
            cfg.MODEL.DISTILLATOR[block][name] = value


def _merge_file(cfg: CfgNode, path: Path) -> None:
    try:
        cfg.merge_from_file(str(path))
    except (KeyError, ValueError, AssertionError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg.LGD.PRESET = path.stem


def _schedule_inputs(cfg: CfgNode) -> tuple:
    return cfg.SOLVER.MAX_ITER, tuple(sorted(cfg.LGD.RELATIVE_SCHEDULE.items()))


def build_config(source: str | Path | SavedConfig = "demo", overrides: Sequence[str] = (), *,
                 device: str | None = None, resolve_dataset: bool = True) -> CfgNode:
    """Assemble a checked, frozen config: defaults + source + `--set` overrides + what the data determines.

    Args:
        source: a preset name (see `lgd presets`), a path to a YAML file, or a SavedConfig
            (a checkpoint's embedded config: the config it was trained with).
        overrides: `KEY=VALUE` strings, applied in order (the last word wins).
        device: "cpu", "cuda", "cuda:1"...; None picks CUDA when available.
        resolve_dataset: fill dataset paths and class names from LGD.DATA (False only for
            model-only uses). A SavedConfig keeps the data it was built with: its class names
            are those its weights were trained on.

    With LGD.RELATIVE_SCHEDULE.ENABLED the iteration keys (_DERIVED_KEYS) follow from
    SOLVER.MAX_ITER; a SavedConfig keeps its own unless the overrides change MAX_ITER or the
    fractions. Either way a derived key set explicitly in `overrides` wins.
    """
    cfg = base_config()
    saved = isinstance(source, SavedConfig)
    if saved:
        _merge_saved(cfg, source)
    else:
        _merge_file(cfg, resolve_preset(str(source)))
    pairs = parse_overrides(cfg, overrides)
    schedule_before = _schedule_inputs(cfg)
    _merge_pairs(cfg, pairs)
    if cfg.LGD.RELATIVE_SCHEDULE.ENABLED and (not saved or _schedule_inputs(cfg) != schedule_before):
        _apply_relative_schedule(cfg)
        # An iteration key the user set explicitly wins over the fraction it derives from.
        _merge_pairs(cfg, [(key, value) for key, value in pairs if key in _DERIVED_KEYS])
    _resolve_device(cfg, device)
    if resolve_dataset and not saved:
        resolve_data(cfg)
    _check(cfg)
    cfg.freeze()
    return cfg

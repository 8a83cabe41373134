"""`lgd convert-swin-weights`: official or OpenMMLab Swin ImageNet checkpoints -> our backbone's keys.

One rule table per layout; a key no rule names stops the conversion (nothing is guessed), and the
result is checked key by key and shape by shape against our SwinTransformer of the inferred size.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from lgd_cli.modeling.weight_files import read_checkpoint
from lgd_cli.errors import CheckpointError, ConfigError
from lgd_cli.files import atomic_torch_save

PREFIX = "backbone.bottom_up."  # where the trunk sits in a detectron2 detector (FPN.bottom_up)
AUTHOR = "lgd convert-swin-weights"

_BUFFER = "buffer, recomputed"
_MASK = "buffer, rebuilt per input size"
_HEAD = "ImageNet classifier"
_FINAL_NORM = "final norm, unused (per-stage norms start fresh, as in the reference)"


def unfold_to_official(t: Tensor) -> Tensor:
    """Reorder the last dim (4C) of a patch-merging tensor from OpenMMLab's to the official order.

    Official: cat(x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]) -> index k·C + c, where
    neighbour k sits at row offset k % 2, column offset k // 2. OpenMMLab: nn.Unfold(2, stride=2) ->
    index c·4 + p, kernel position p = 2·row + column. So official (k, c) reads OpenMMLab c·4 + p(k),
    p = [0, 2, 1, 3]: the neighbour order differs and channels are interleaved.
    """
    C = t.shape[-1] // 4
    k = torch.arange(4)
    p = 2 * (k % 2) + k // 2
    source = (torch.arange(C)[None, :] * 4 + p[:, None]).flatten()
    return t[..., source]


@dataclass(frozen=True)
class Rule:
    """Keys matching `pattern` become `target` (re.sub template), or are dropped when target is None."""

    pattern: str
    target: str | None
    why: str = ""  # shown for dropped keys
    convert: Callable[[Tensor], Tensor] | None = None


_B = r"(\d+)\.blocks\.(\d+)"
OFFICIAL = [
    Rule(r"patch_embed\.(proj|norm)\.(weight|bias)", r"patch_embed.\1.\2"),
    Rule(rf"layers\.{_B}\.(norm1|norm2)\.(weight|bias)", r"layers.\1.blocks.\2.\3.\4"),
    Rule(rf"layers\.{_B}\.attn\.(qkv|proj)\.(weight|bias)", r"layers.\1.blocks.\2.attn.\3.\4"),
    Rule(rf"layers\.{_B}\.attn\.relative_position_bias_table", r"layers.\1.blocks.\2.attn.relative_position_bias_table"),
    Rule(rf"layers\.{_B}\.mlp\.(fc1|fc2)\.(weight|bias)", r"layers.\1.blocks.\2.mlp.\3.\4"),
    Rule(r"layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", r"layers.\1.downsample.\2"),
    Rule(rf"layers\.{_B}\.attn\.relative_position_index", None, _BUFFER),
    Rule(rf"layers\.{_B}\.attn_mask", None, _MASK),
    Rule(r"norm\.(weight|bias)", None, _FINAL_NORM),
    Rule(r"head\.(weight|bias)", None, _HEAD),
]
OPENMMLAB = [  # mmcls / mmdet / mmpretrain Swin v1, after an optional "backbone." prefix
    Rule(r"patch_embed\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    Rule(r"patch_embed\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    Rule(rf"stages\.{_B}\.(norm1|norm2)\.(weight|bias)", r"layers.\1.blocks.\2.\3.\4"),
    Rule(rf"stages\.{_B}\.attn\.w_msa\.(qkv|proj)\.(weight|bias)", r"layers.\1.blocks.\2.attn.\3.\4"),
    Rule(rf"stages\.{_B}\.attn\.w_msa\.relative_position_bias_table",
         r"layers.\1.blocks.\2.attn.relative_position_bias_table"),
    Rule(rf"stages\.{_B}\.ffn\.layers\.0\.0\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc1.\3"),
    Rule(rf"stages\.{_B}\.ffn\.layers\.1\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc2.\3"),
    Rule(r"stages\.(\d+)\.downsample\.reduction\.weight", r"layers.\1.downsample.reduction.weight",
         convert=unfold_to_official),
    Rule(r"stages\.(\d+)\.downsample\.norm\.(weight|bias)", r"layers.\1.downsample.norm.\2", convert=unfold_to_official),
    Rule(rf"stages\.{_B}\.attn\.w_msa\.relative_position_index", None, _BUFFER),
    Rule(r"norm\d*\.(weight|bias)", None, _FINAL_NORM),
    Rule(r"head\..+", None, _HEAD),
]
LAYOUTS = {"official": OFFICIAL, "OpenMMLab": OPENMMLAB}


@dataclass
class ConversionReport:
    """What `convert_swin_weights` read, wrote and left out."""

    source: Path
    target: Path
    layout: str
    architecture: dict  # embed_dim, depths, num_heads, window_size (what MODEL.SWINT must say)
    kept: int
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source key, why)


def default_target(source: Path) -> Path:
    """IN's stem + `_converted.pth`, beside it (the presets' pretrained_backbones/..._converted.pth)."""
    return source.with_name(f"{source.stem}_converted.pth")


def _source_state(path: Path) -> tuple[dict, str]:
    data = read_checkpoint(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a Swin checkpoint (it holds a {type(data).__name__}, not a dict)")
    for wrapper in ("model", "state_dict"):  # official: {"model": ...}; OpenMMLab: {"state_dict": ..., "meta": ...}
        if isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    if not data:
        raise CheckpointError(f"{path} holds no weights")
    keys = list(data)
    if keys[0].startswith(PREFIX):
        raise CheckpointError(f"{path} is already in lgd's layout ({keys[0]})",
                              hint=f"use it as it is: --set MODEL.WEIGHTS={path}")
    names = [k.removeprefix("backbone.") for k in keys]
    if any(n.startswith(("stages.", "patch_embed.projection.")) for n in names):
        return {n: data[k] for n, k in zip(names, keys)}, "OpenMMLab"
    if any(k.startswith(("layers.", "patch_embed.proj.")) for k in keys):
        return data, "official"
    raise CheckpointError(f"{path} is not a Swin checkpoint in a known layout (first key: {keys[0]})",
                          hint="lgd converts the official (microsoft/Swin-Transformer) and OpenMMLab "
                          "ImageNet checkpoints of Swin v1")


def _apply_rules(path: Path, state: dict, layout: str) -> tuple[dict[str, Tensor], list[tuple[str, str]]]:
    rules = [(re.compile(r.pattern), r) for r in LAYOUTS[layout]]
    kept, dropped = {}, []
    for key, value in state.items():
        match = next(((m, rule) for regex, rule in rules if (m := regex.fullmatch(key))), None)
        if match is None:
            raise CheckpointError(f"{path}: unexpected key '{key}' for the {layout} Swin layout: not converted",
                                  hint="lgd converts ImageNet checkpoints of Swin v1 without absolute position "
                                  "embedding (official or OpenMMLab layout)")
        m, rule = match
        if rule.target is None:
            dropped.append((key, rule.why))
            continue
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: '{key}' is a {type(value).__name__}, not a tensor")
        kept[m.expand(rule.target)] = rule.convert(value) if rule.convert else value
    return kept, dropped


def infer_architecture(path: Path, kept: dict[str, Tensor]) -> dict:
    """embed_dim, depths, num_heads, window_size and in_chans read off the tensors' shapes."""
    try:
        proj = kept["patch_embed.proj.weight"]
        stages = 1 + max(int(k.split(".")[1]) for k in kept if k.startswith("layers."))
        depths = [1 + max((int(k.split(".")[3]) for k in kept if k.startswith(f"layers.{i}.blocks.")), default=-1)
                  for i in range(stages)]
        tables = [kept[f"layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(stages)]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} lacks Swin weights ({exc}): incomplete or not a Swin checkpoint") from None
    side = round(tables[0].shape[0] ** 0.5)
    return {"embed_dim": proj.shape[0], "depths": depths, "num_heads": [t.shape[1] for t in tables],
            "window_size": (side + 1) // 2, "in_chans": proj.shape[1], "patch_size": proj.shape[-1]}


def _check_against_backbone(path: Path, kept: dict[str, Tensor], arch: dict) -> None:
    # Build our trunk of that size without allocating memory, and compare names and shapes.
    from lgd_cli.modeling.backbones.swin import SwinTransformer

    with torch.device("meta"):
        model = SwinTransformer(in_chans=arch["in_chans"], embed_dim=arch["embed_dim"], depths=arch["depths"],
                                num_heads=arch["num_heads"], window=arch["window_size"], patch=arch["patch_size"],
                                out_features=())
    expected = model.state_dict()
    missing = [k for k in expected if k not in kept]
    if missing:
        raise CheckpointError(f"{path} lacks '{missing[0]}' ({len(missing)} tensors missing): incomplete checkpoint")
    for key, value in kept.items():
        if key not in expected or expected[key].shape != value.shape:
            shape = tuple(expected[key].shape) if key in expected else "no such tensor"
            raise CheckpointError(f"{path}: '{key}' has shape {tuple(value.shape)}, a Swin of {describe_architecture(arch)} "
                                  f"has {shape}: inconsistent checkpoint")


def describe_architecture(arch: dict) -> str:
    return (f"embed {arch['embed_dim']}, depths {'-'.join(map(str, arch['depths']))}, "
            f"heads {'-'.join(map(str, arch['num_heads']))}, window {arch['window_size']}")


def convert_swin_weights(source: Path, target: Path | None = None, *, force: bool = False) -> ConversionReport:
    """Convert a Swin ImageNet checkpoint into a file MODEL.WEIGHTS loads into our Swin backbone.

    Args:
        source: official (`{"model": {...}}`) or OpenMMLab (`{"state_dict": {...}}`, keys optionally
            under `backbone.`) checkpoint.
        target: output file; default `default_target(source)`. Written atomically.
        force: overwrite an existing target.

    Returns:
        The report: layout, inferred architecture, tensors kept and keys dropped (with the reason).
    """
    source = Path(source)
    target = Path(target) if target is not None else default_target(source)
    if not source.is_file():
        raise CheckpointError(f"Swin checkpoint {source} does not exist")
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists", hint="add --force to overwrite it, or name another output file")
    state, layout = _source_state(source)
    kept, dropped = _apply_rules(source, state, layout)
    arch = infer_architecture(source, kept)
    _check_against_backbone(source, kept, arch)
    out = {"model": {PREFIX + k: v.contiguous() for k, v in kept.items()}, "__author__": AUTHOR,
           "swin": {"layout": layout, **{k: arch[k] for k in ("embed_dim", "depths", "num_heads", "window_size")}}}
    if not target.parent.is_dir():
        raise CheckpointError(f"cannot write {target}: folder {target.parent} does not exist")
    atomic_torch_save(out, target)
    return ConversionReport(source, target, layout, arch, len(kept), dropped)


def key_pattern(key: str) -> str:
    # layers.3.blocks.1.attn_mask -> layers.*.blocks.*.attn_mask; head.weight -> head.{weight,bias}
    key = re.sub(r"\.\d+(?=\.)", ".*", key)
    return re.sub(r"\.(weight|bias)$", ".{weight,bias}", key)

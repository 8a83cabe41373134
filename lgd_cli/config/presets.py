"""Shipped presets: YAML files in lgd_cli/presets (the repository's presets/), found via importlib.resources."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from lgd_cli.errors import ConfigError


@dataclass(frozen=True)
class PresetInfo:
    name: str
    path: Path
    meta: dict


def preset_dir() -> Path:
    # Presets are plain files inside the installed package (editable or wheel), so a Path is safe.
    return Path(str(resources.files("lgd_cli") / "presets"))


def list_presets() -> list[PresetInfo]:
    """All user-facing presets (files starting with '_' are shared bases), sorted by name."""
    out = []
    for path in sorted(preset_dir().glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        out.append(PresetInfo(path.stem, path, read_meta(path)))
    return out


def read_meta(path: Path) -> dict:
    """The LGD.META block of a preset, following _BASE_ files."""
    data = yaml.safe_load(path.read_text()) or {}
    meta = {}
    if "_BASE_" in data:
        meta.update(read_meta(path.parent / data["_BASE_"]))
    meta.update((data.get("LGD") or {}).get("META") or {})
    return meta


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (e.g. `retinanet-r50-2x`) or a path to a YAML file -> the file to merge."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"config file {candidate} does not exist")
        return candidate
    path = preset_dir() / f"{name_or_path}.yaml"
    if path.is_file() and not name_or_path.startswith("_"):
        return path
    names = [p.name for p in list_presets()]
    close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else "`lgd presets` lists them"
    raise ConfigError(f"unknown preset '{name_or_path}'", hint=hint)

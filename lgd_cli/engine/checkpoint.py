"""Checkpoints that rebuild their run: atomic writes, the resolved config inside, safe loading.

A checkpoint holds the model, both optimisers and schedulers (through the trainer's state),
and `lgd`: {config (YAML text), preset, class_names, version}. Everything is plain Python or
tensors, so it loads with `torch.load(weights_only=True)`: no code runs from a checkpoint.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path

import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer

from lgd_cli import __version__
from lgd_cli.errors import CheckpointError
from lgd_cli.files import atomic_torch_save, atomic_write_bytes


def lgd_metadata(cfg) -> dict:
    return {"config": cfg.dump(), "preset": cfg.LGD.PRESET, "class_names": list(cfg.LGD.CLASS_NAMES),
            "version": __version__}


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
_PICKLE_PROTO = 0x80  # a pickle of protocol 2+ (torch's legacy format, .pkl weights) starts with PROTO, version


def sniff_file(path: Path) -> str:
    """What a would-be checkpoint file is, from its first bytes: zip, pickle, empty, yaml, text or unknown.

    torch's unpickler reads any other bytes as opcodes and fails with a meaningless KeyError, so
    a text or config file given by mistake is named before it is loaded.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "empty"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[0] == _PICKLE_PROTO and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the 4096-byte boundary
            return "unknown"
        text = head[: exc.start].decode("utf-8")
    if "\x00" in text or not text.strip():
        return "unknown"
    if Path(path).suffix.lower() in (".yaml", ".yml") or _looks_like_config(text):
        return "yaml"
    return "text"


def _looks_like_config(text: str) -> bool:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and any(key in data for key in ("_BASE_", "MODEL", "SOLVER", "LGD"))


_CHECKPOINT_HINT = "a checkpoint is a .pth file torch wrote (lgd train's: RUN_FOLDER/model_final.pth)"


def _not_a_checkpoint(path: Path, kind: str) -> CheckpointError:
    if kind == "yaml":
        return CheckpointError(f"{path} is a YAML file (a config?), not a checkpoint",
                               hint=f"train from it with lgd train --preset {path}")
    if kind == "text":
        return CheckpointError(f"{path} is a text file, not a checkpoint", hint=_CHECKPOINT_HINT)
    if kind == "empty":
        return CheckpointError(f"{path} is not a readable checkpoint (the file is empty)",
                               hint="it may be truncated (interrupted copy or full disk)")
    return CheckpointError(f"{path} is not a checkpoint (unknown format)", hint=_CHECKPOINT_HINT)


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint file `path` names: for a run folder the file its `last_checkpoint` points to,
    else its model_final.pth (CheckpointError if there is none); any other path as it is (the
    reader names a missing file)."""
    path = Path(path)
    if not path.is_dir():
        return path
    pointer = path / "last_checkpoint"
    if pointer.is_file():
        named = path / pointer.read_text().strip()
        if named.is_file():
            return named
    if (path / "model_final.pth").is_file():
        return path / "model_final.pth"
    raise CheckpointError(f"{path} is a folder that holds no checkpoint (no last_checkpoint, no model_final.pth)",
                          hint="give a run folder of `lgd train` (its --output) or a .pth file")


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint file safely, turning every way it can be wrong into a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder, not a checkpoint file")
        raise CheckpointError(f"checkpoint {path} does not exist")
    kind = sniff_file(path)
    if kind not in ("zip", "pickle"):
        raise _not_a_checkpoint(path, kind)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
            raise CheckpointError(f"{path} holds Python objects that could run code when loaded: refused",
                                  hint="lgd loads only tensors and plain data (see README, Robustness)") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({first})",
                              hint="it may be truncated (interrupted copy or full disk)") from None


def read_lgd_checkpoint(path: Path) -> dict:
    """A checkpoint written by `lgd train` (with its embedded config), or a CheckpointError."""
    data = read_checkpoint(path)
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"{path} is not an lgd checkpoint: it has no 'model' entry (a plain state dict, "
                              "e.g. torchvision's?)",
                              hint="plain detectron2/torchvision weights go in MODEL.WEIGHTS (--set) of `lgd train`")
    if "lgd" not in data:
        raise CheckpointError(f"{path} is not an lgd checkpoint: it has no embedded config (not written by "
                              "`lgd train`; a detectron2 checkpoint?)",
                              hint="plain detectron2/torchvision weights go in MODEL.WEIGHTS (--set) of `lgd train`")
    return data


# What detectron2/MSRA `.pkl` weights legitimately contain: numpy arrays in plain containers.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
}


class _WeightsUnpickler(pickle.Unpickler):
    """Builds only numpy arrays and containers; any other global (code) is refused."""

    def find_class(self, module, name):
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def check_pickle_weights(path: Path) -> None:
    """Refuse a `.pkl` weights file that would build anything but numpy arrays and containers.

    The restricted load constructs nothing else, so running it is safe; detectron2's own loader
    (which uses plain pickle) runs only after this passed.
    """
    try:
        with open(path, "rb") as f:
            _WeightsUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise CheckpointError(f"weights file {path} does not exist") from None
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} refers to {exc}, which could run code when loaded: refused",
                              hint=".pkl weights may hold only numpy arrays (see README, Robustness)") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{path} is not a readable .pkl weights file ({type(exc).__name__})") from None


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer (model-zoo conversions included) that never unpickles code."""

    def _load_file(self, f: str):
        if f.endswith(".pkl"):
            check_pickle_weights(Path(f))
            return super()._load_file(f)
        loaded = read_checkpoint(Path(f))
        return loaded if "model" in loaded else {"model": loaded}


class LGDCheckpointer(SafeDetectionCheckpointer):
    """DetectionCheckpointer whose files are written atomically and carry the run's config.

    Args:
        model: the (unwrapped) LGDDistiller.
        save_dir: the run folder.
        cfg: the frozen config, embedded in every file.
        checkpointables: objects with state_dict/load_state_dict (the trainer).
    """

    # Written beside the run's checkpoints but never resumed from, nor named by last_checkpoint: the
    # best periodic evaluation's weights (BestCheckpointer), an older state than the newest.
    NOT_RESUMED = ("model_best",)

    def __init__(self, model, save_dir: str, cfg, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self._lgd = lgd_metadata(cfg)
        self.last_saved: str | None = None  # newest complete checkpoint written or resumed from

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), "lgd": self._lgd}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        target = Path(self.save_dir) / f"{name}.pth"
        try:
            atomic_torch_save(data, target)
        except OSError as exc:
            raise CheckpointError(f"could not write checkpoint {target}: {exc.strerror or exc}",
                                  hint="the previous checkpoint is intact; free disk space and --resume") from None
        if name in self.NOT_RESUMED:
            return
        self.tag_last_checkpoint(target.name)
        self.last_saved = str(target)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        # The pointer moves only once the file it names is complete.
        atomic_write_bytes(Path(self.save_dir) / "last_checkpoint",
                           lambda f: f.write(last_filename_basename.encode()))

    def resume_path(self) -> str | None:
        """The newest complete checkpoint to resume from, or None for a fresh start.

        Newest by modification time (`last_checkpoint`'s file first on a tie, and also when a kill
        came between a checkpoint's rename and the pointer's update); an unreadable (truncated)
        file is skipped with a warning naming it, so the previous complete one is used.
        """
        last = self.get_checkpoint_file() if self.has_checkpoint() else None
        files = [p for p in self.get_all_checkpoint_files()
                 if (Path(p).name.startswith("model_") and Path(p).stem not in self.NOT_RESUMED) or p == last]
        if not files:
            return None
        candidates = sorted(files, key=lambda p: (os.path.getmtime(p), p == last), reverse=True)
        problems = []
        for candidate in candidates:
            try:
                read_checkpoint(Path(candidate))
            except CheckpointError as exc:
                problems.append(exc.message)
                continue
            for problem in problems:
                logging.getLogger("lgd_cli").warning(f"skipping {problem}; resuming from {candidate}")
            return candidate
        raise CheckpointError(f"no readable checkpoint in {self.save_dir} to resume from: {'; '.join(problems)}",
                              hint="start afresh with --force (deletes these checkpoints)")

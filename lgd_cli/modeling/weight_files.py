"""Reading weight and checkpoint files without running code from them.

What a file is (from its first bytes, so a text or config file given by mistake is named as
such), `torch.load(weights_only=True)` for torch files, a restricted unpickler for detectron2's
`.pkl` weights, and detectron2's checkpointer on top of both. Used by the pretrained-weight
loader here and by lgd's run checkpoints (lgd_cli/engine/checkpoint.py).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer

from lgd_cli.errors import CheckpointError

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

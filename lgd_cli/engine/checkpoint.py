"""Checkpoints that rebuild their run: atomic writes, the resolved config inside, safe loading
(lgd_cli/modeling/weight_files.py).

A checkpoint holds the model, both optimisers and schedulers (through the trainer's state),
and `lgd`: {config (YAML text), preset, class_names, version}. Everything is plain Python or
tensors, so it loads with `torch.load(weights_only=True)`: no code runs from a checkpoint.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from lgd_cli import __version__
from lgd_cli.errors import CheckpointError
from lgd_cli.files import atomic_torch_save, atomic_write_bytes
from lgd_cli.modeling.weight_files import SafeDetectionCheckpointer, read_checkpoint


def lgd_metadata(cfg) -> dict:
    return {"config": cfg.dump(), "preset": cfg.LGD.PRESET, "class_names": list(cfg.LGD.CLASS_NAMES),
            "version": __version__}


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

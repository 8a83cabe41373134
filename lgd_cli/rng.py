"""Random number generator state as plain tensors, so checkpoints keep loading with weights_only=True."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def _cpu_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }


def capture_rng_state() -> dict:
    """Python `random`, numpy's global RandomState, torch CPU and (when initialised) CUDA generators."""
    state = _cpu_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Undo `capture_rng_state`; a CUDA state is restored only where the same devices exist."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without it moving the CPU generators (python, numpy, torch) of this process.

    CUDA is never queried: the data loader's worker processes run this for every sample.
    """
    state = _cpu_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)

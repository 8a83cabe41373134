"""What a measurement needs to know about the machine: this process's peak memory, the CPU load."""
from __future__ import annotations

import os
import resource
import sys


def peak_memory_mb(device) -> float:
    """Peak memory of this process on `device` (a torch.device or its name): the CUDA allocator's
    peak on a GPU, the resident set size's on the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def cpu_load() -> tuple[float, int] | None:
    """(1-minute load average, CPU count), or None where the system does not tell."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on Windows
        return None
    return load, os.cpu_count() or 1

"""Run a function in N processes: NCCL on GPUs, gloo on CPU (detectron2's `launch` asserts CUDA)."""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from lgd_cli.compat import detectron2 as _compat
from lgd_cli.errors import ConfigError, LgdError


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_processes(num_processes: int, num_machines: int = 1, machine_rank: int = 0, *,
                    use_cuda: bool | None = None) -> None:
    """Refuse a process layout this machine cannot run (ConfigError), before anything is written.

    With CUDA, one process per GPU: more than the visible devices is refused. Without CUDA (or with
    --device cpu), `--gpus N` runs N CPU processes on gloo, a debugging mode.
    """
    if num_processes < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise ConfigError(f"--gpus {num_processes}, --machines {num_machines}, --machine-rank {machine_rank} do not fit",
                          hint="--gpus and --machines are at least 1; --machine-rank is 0 .. machines-1")
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if use_cuda and num_processes > torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"--gpus {num_processes} asked for, but only {count} CUDA device"
                          f"{'' if count == 1 else 's'} {'is' if count == 1 else 'are'} visible",
                          hint=f"use --gpus {count} or fewer (CUDA_VISIBLE_DEVICES limits what is visible); "
                               "--device cpu --gpus N runs N CPU processes (gloo), for debugging")


def launch(worker, num_processes: int, *, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", use_cuda: bool | None = None, args: tuple = ()):
    """Call `worker(*args)` once per process of a (possibly multi-machine) job.

    Args:
        num_processes: processes on this machine (one per GPU on CUDA).
        num_machines, machine_rank, dist_url: the multi-machine rendezvous (tcp://HOST:PORT).
        use_cuda: NCCL and one GPU per process, or gloo on CPU; default: whether CUDA is available.

    Returns:
        worker's return value in a single-process run, None otherwise.

    Raises:
        The LgdError a process raised (same class, message, hint and exit code, "process N: "
        prefixed), or an LgdError naming the process and its error, signal or exit code.
    """
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    check_processes(num_processes, num_machines, machine_rank, use_cuda=use_cuda)
    world_size = num_processes * num_machines
    if world_size == 1:
        return worker(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ConfigError("--dist-url tcp://HOST:PORT is required with --machines > 1")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="lgd-launch-") as errors:
        try:
            mp.start_processes(_distributed_worker, nprocs=num_processes, start_method="spawn",
                               args=(worker, world_size, num_processes, machine_rank, dist_url, use_cuda, errors, args))
        except mp.ProcessRaisedException as exc:
            raise _raised_error(Path(errors), exc.error_index, str(exc)) from None
        except mp.ProcessExitedException as exc:
            raise _exited_error(exc.error_index, exc.exit_code) from None
    return None


def _raised_error(errors: Path, index: int, trace: str) -> LgdError:
    """The error process `index` raised, rebuilt from the record it left, or its traceback's last line."""
    try:
        record = json.loads((errors / f"{index}.json").read_text())
        cls = getattr(importlib.import_module(record["module"]), record["name"])
        if isinstance(cls, type) and issubclass(cls, LgdError):
            return cls(f"process {index}: {record['message']}", hint=record["hint"], exit_code=record["exit_code"])
    except (OSError, ValueError, KeyError, ImportError, AttributeError):
        pass  # not an LgdError: the traceback it printed is all there is
    if os.environ.get("LGD_DEBUG") == "1":
        return LgdError(f"training process {index} failed:{trace}")
    last = trace.strip().splitlines()[-1] if trace.strip() else "no message"
    return LgdError(f"training process {index} failed: {last}", hint="run with --debug for its traceback")


def _exited_error(index: int, exit_code: int) -> LgdError:
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        hint = ("SIGKILL from outside is often the kernel's out-of-memory killer (see `dmesg`): fewer "
                "DATALOADER.NUM_WORKERS or a smaller batch use less memory" if -exit_code == signal.SIGKILL else None)
        return LgdError(f"training process {index} was killed by {name}", hint=hint, exit_code=128 - exit_code)
    return LgdError(f"training process {index} exited with code {exit_code}", exit_code=exit_code)


def _distributed_worker(local_rank, worker, world_size, num_per_machine, machine_rank, dist_url, use_cuda,
                        errors, args):
    _compat.fork_data_workers()
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=dist_url, world_size=world_size,
                            rank=rank, timeout=timedelta(minutes=30))
    # detectron2's comm.get_local_rank() reads this group; its own launch() creates it.
    for machine in range(world_size // num_per_machine):
        ranks = list(range(machine * num_per_machine, (machine + 1) * num_per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    if use_cuda:
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    try:
        worker(*args)
    except LgdError as exc:
        # The parent sees only a traceback; this record lets it raise the same error.
        record = {"module": type(exc).__module__, "name": type(exc).__name__, "message": exc.message,
                  "hint": exc.hint, "exit_code": exc.exit_code}
        (Path(errors) / f"{local_rank}.json").write_text(json.dumps(record))
        raise
    finally:
        dist.destroy_process_group()

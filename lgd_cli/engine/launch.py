"""Run a function in N processes: NCCL on GPUs, gloo on CPU (detectron2's `launch` asserts CUDA)."""
from __future__ import annotations

import socket
from datetime import timedelta

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


def launch(worker, num_processes: int, *, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args: tuple = ()):
    """Call `worker(*args)` once per process of a (possibly multi-machine) job.

    Args:
        num_processes: processes on this machine (one per GPU on CUDA).
        num_machines, machine_rank, dist_url: the multi-machine rendezvous (tcp://HOST:PORT).

    Returns:
        worker's return value in a single-process run, None otherwise.
    """
    if num_processes < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise ConfigError(f"--gpus {num_processes}, --machines {num_machines}, --machine-rank {machine_rank} do not fit")
    if torch.cuda.is_available() and num_processes > torch.cuda.device_count():
        raise ConfigError(f"--gpus {num_processes} asked for, but only {torch.cuda.device_count()} CUDA devices are visible")
    world_size = num_processes * num_machines
    if world_size == 1:
        return worker(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ConfigError("--dist-url tcp://HOST:PORT is required with --machines > 1")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    try:
        mp.start_processes(_distributed_worker, nprocs=num_processes, start_method="spawn",
                           args=(worker, world_size, num_processes, machine_rank, dist_url, args))
    except mp.ProcessRaisedException as exc:
        # The worker's traceback is in the message; its last line names the error.
        raise LgdError(f"a training process failed: {str(exc).strip().splitlines()[-1]}") from None
    return None


def _distributed_worker(local_rank, worker, world_size, num_per_machine, machine_rank, dist_url, args):
    _compat.fork_data_workers()
    use_cuda = torch.cuda.is_available()
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
    finally:
        dist.destroy_process_group()

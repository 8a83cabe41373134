"""Run a function in N processes on one or several machines: NCCL on GPUs, gloo on CPU.

The training processes start as detectron2's `launch` starts them (torch.multiprocessing spawn, one
per GPU, detectron2's comm set up), which cannot be called itself: it asserts CUDA, and with several
machines one that fails or never comes leaves the others waiting for ever. So the `lgd train` process
of each machine (its launcher) first meets the others on a torch.distributed TCPStore that machine 0's
launcher hosts at --dist-url, and keeps watching it while its processes train:

- each machine checks in with its options, so a machine that is missing after `join_timeout` seconds,
  or was started with other options, is named on every machine;
- a failure anywhere (an error, a killed process) is published there, and every launcher stops its
  processes within a second and raises that same error, naming the machine and rank;
- the main process's return value travels back through it to every machine.

The training processes use the same store for torch.distributed's own rendezvous (README, "Several
machines").
"""
from __future__ import annotations

import importlib
import json
import logging
import signal
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from lgd_cli.compat import detectron2 as _compat
from lgd_cli.errors import ConfigError, LGDError

JOIN_TIMEOUT_S = 300.0
# One collective may wait this long: the main process evaluating or writing a checkpoint.
_OP_TIMEOUT = timedelta(minutes=30)
_POLL_S = 0.5
# A launcher whose process failed with a foreign error (a peer's socket closed) waits this long for
# the failure that caused it to be published.
_CAUSE_WAIT_S = 3.0
# Machine 0's launcher keeps the store up this long at most for the others to read how the job ended.
_LINGER_S = 10.0
_FAILURE, _RESULT, _LEFT, _STARTED = "lgd/failure", "lgd/result", "lgd/left", "lgd/started"


def parse_dist_url(dist_url: str, num_machines: int = 1) -> tuple[str, int]:
    """(host, port) of --dist-url; `auto` is 127.0.0.1 and a free port, for one machine only (ConfigError)."""
    example = "e.g. --dist-url tcp://10.0.0.1:29500: machine 0's address as the others reach it and a free port"
    if dist_url == "auto":
        if num_machines > 1:
            raise ConfigError("--dist-url auto needs --machines 1: the machines cannot guess where they meet",
                              hint=f"give every machine the same --dist-url tcp://HOST:PORT, {example}")
        return "127.0.0.1", 0
    parts = urlsplit(dist_url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None or parts.path not in ("", "/") \
            or (port == 0 and num_machines > 1):
        raise ConfigError(f"--dist-url {dist_url} is not tcp://HOST:PORT", hint=example)
    return parts.hostname, port


def dist_url_of(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def check_processes(num_processes: int, num_machines: int = 1, machine_rank: int = 0, *,
                    use_cuda: bool | None = None, dist_url: str = "auto") -> None:
    """Refuse a process layout this machine cannot run (ConfigError), before anything is written.

    With CUDA, one process per GPU: more than the visible devices is refused. Without CUDA (or with
    --device cpu), `--gpus N` runs N CPU processes on gloo, a debugging mode. Several machines need
    a tcp://HOST:PORT --dist-url.
    """
    if num_processes < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise ConfigError(f"--gpus {num_processes}, --machines {num_machines}, --machine-rank {machine_rank} do not fit",
                          hint="--gpus and --machines are at least 1; --machine-rank is 0 .. machines-1")
    parse_dist_url(dist_url, num_machines)
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if use_cuda and num_processes > torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"--gpus {num_processes} asked for, but only {count} CUDA device"
                          f"{'' if count == 1 else 's'} {'is' if count == 1 else 'are'} visible",
                          hint=f"use --gpus {count} or fewer (CUDA_VISIBLE_DEVICES limits what is visible); "
                               "--device cpu --gpus N runs N CPU processes (gloo), for debugging")


def launch(worker, num_processes: int, *, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", use_cuda: bool | None = None, join_timeout: float = JOIN_TIMEOUT_S,
           agree: dict | None = None, args: tuple = ()):
    """Call `worker(*args)` once per process of a (possibly multi-machine) job.

    Args:
        num_processes: processes on this machine (one per GPU on CUDA), the same on every machine.
        num_machines, machine_rank, dist_url: the multi-machine rendezvous (tcp://HOST:PORT).
        use_cuda: NCCL and one GPU per process, or gloo on CPU; default: whether CUDA is available.
        join_timeout: seconds to wait for every machine to check in.
        agree: JSON-able {name: value} every machine must have alike (named when they differ).

    Returns:
        The main process's (global rank 0's) return value, on every machine; it must be JSON-able
        when there are several processes.

    Raises:
        The LGDError a process raised (same class, message, hint and exit code, "process N: " or,
        with several machines, "machine M, rank R: " prefixed), or an LGDError naming the process
        and its error, signal or exit code, or the machines that did not join.
    """
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    check_processes(num_processes, num_machines, machine_rank, use_cuda=use_cuda, dist_url=dist_url)
    if num_processes * num_machines == 1:
        return worker(*args)
    host, port = parse_dist_url(dist_url, num_machines)
    layout = {"--gpus": num_processes, "--machines": num_machines, **(agree or {})}
    job = Rendezvous.join(host, port, num_machines, machine_rank, join_timeout, layout)
    try:
        return _run(job, worker, num_processes, use_cuda, args)
    finally:
        job.leave()


def report_failure(error: LGDError, *, num_machines: int, machine_rank: int, dist_url: str,
                   wait_s: float = 10.0) -> None:
    """Tell the other machines that this one failed before joining (best effort, for `wait_s` at most).

    So a bad dataset path or a refused run folder on one machine stops the others at once instead of
    after the join timeout; machines started together reach the rendezvous within seconds.
    """
    if num_machines < 2:
        return
    try:
        host, port = parse_dist_url(dist_url, num_machines)
    except ConfigError:
        return
    record = _record(error, f"machine {machine_rank}: {error.message}")
    deadline = time.monotonic() + wait_s
    try:
        if machine_rank == 0:
            store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=_OP_TIMEOUT)
            store.set(_FAILURE, record)
            # The others read it when they check in, then leave.
            while store.add(_LEFT, 0) < num_machines - 1 and time.monotonic() < deadline:
                time.sleep(0.1)
        elif _port_open(host, port, deadline):
            store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=wait_s))
            if not store.check([_STARTED]):  # a run that started without us is another run: leave it be
                store.compare_set(_FAILURE, "", record)
    except (dist.DistError, OSError):
        pass  # the port is taken or the others are gone: nobody to tell


class Rendezvous:
    """The launchers of one job on machine 0's TCPStore: check-in, failures, the main process's result."""

    def __init__(self, store, host: str, port: int, num_machines: int, machine_rank: int):
        self.store, self.host, self.port = store, host, port
        self.url = dist_url_of(host, port)
        self.num_machines, self.machine_rank = num_machines, machine_rank

    @classmethod
    def join(cls, host: str, port: int, num_machines: int, machine_rank: int, timeout: float,
             layout: dict) -> "Rendezvous":
        """Host (machine 0) or reach the store, check in, and wait until every machine has (LGDError if not)."""
        deadline = time.monotonic() + timeout
        if machine_rank == 0:
            try:
                store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=_OP_TIMEOUT)
            except dist.DistError as exc:
                raise LGDError(f"cannot listen on tcp://{host}:{port}: {_first_line(exc)}",
                               hint="another run or program holds the port: choose a free PORT in --dist-url, "
                                    "the same on every machine") from None
            port = store.port  # the free one, for --dist-url auto
        else:
            store = None
            if _port_open(host, port, deadline):
                try:
                    left = timedelta(seconds=max(1.0, deadline - time.monotonic()))
                    store = dist.TCPStore(host, port, is_master=False, timeout=left)
                    store.set_timeout(_OP_TIMEOUT)
                except dist.DistError:
                    store = None
            if store is None:
                raise LGDError(f"machine 0 did not join {dist_url_of(host, port)} within {timeout:g} s",
                               hint="machine 0 hosts the rendezvous: start the same `lgd train ... --machine-rank 0` "
                                    "there, and check that this machine reaches HOST:PORT; --join-timeout S waits longer")
        if store.check([_STARTED]):
            raise LGDError(f"{dist_url_of(host, port)} belongs to a run that has started without this machine",
                           hint="choose another PORT in --dist-url for a new run, the same on every machine")
        job = cls(store, host, port, num_machines, machine_rank)
        try:
            job._check_in(layout, deadline, timeout)
        except LGDError:
            job.leave()  # machine 0 keeps the store a moment, for the others to read why
            raise
        return job

    def _check_in(self, layout: dict, deadline: float, timeout: float) -> None:
        me = self.machine_rank
        if self.store.add(f"lgd/count/{me}", 1) > 1:
            self._fail(LGDError(f"two machines were started with --machine-rank {me}",
                                hint=f"give each of the {self.num_machines} machines its own --machine-rank 0 .. "
                                     f"{self.num_machines - 1}"))
        self.store.set(f"lgd/machine/{me}", json.dumps(layout))
        pending = set(range(self.num_machines)) - {me}
        while True:
            failure = self.failure()
            if failure is not None:
                raise failure
            for other in sorted(pending):
                if self.store.check([f"lgd/machine/{other}"]):
                    theirs = json.loads(self.store.get(f"lgd/machine/{other}"))
                    difference = _difference(min(me, other), max(me, other), *((layout, theirs) if me < other else
                                                                              (theirs, layout)))
                    if difference:
                        self._fail(LGDError(difference, hint="run the same command on every machine: only "
                                            "--machine-rank differs (and paths to data and --output, where disks differ)"))
                    pending.discard(other)
            if not pending:
                self.store.set(_STARTED, "1")
                return
            if time.monotonic() > deadline:
                missing = sorted(pending)
                who = (f"machine {missing[0]}" if len(missing) == 1 else
                       f"machines {', '.join(map(str, missing))}")
                self._fail(LGDError(f"{who} did not join {self.url} within {timeout:g} s",
                                    hint=f"start the same `lgd train ...` with --machine-rank {missing[0]} there "
                                         "(every machine must reach HOST:PORT); --join-timeout S waits longer"))
            time.sleep(_POLL_S)

    def _fail(self, error: LGDError):
        raise self.publish(error)

    def publish(self, error: LGDError) -> LGDError:
        """Publish `error` unless a failure already was; returns the first published one (to raise)."""
        try:
            first = self.store.compare_set(_FAILURE, "", _record(error, error.message))
        except dist.DistError:
            return error
        return _rebuild(json.loads(first))

    def failure(self) -> LGDError | None:
        """The failure another launcher published, or None."""
        try:
            if not self.store.check([_FAILURE]):
                return None
            return _rebuild(json.loads(self.store.get(_FAILURE)))
        except dist.DistError:
            return LGDError(f"machine 0 stopped: {self.url} no longer answers",
                            hint="machine 0's terminal or its run folder's log.txt says why")

    def result(self):
        return json.loads(self.store.get(_RESULT))

    def leave(self) -> None:
        """Say this launcher is done; machine 0's waits (a while at most) for those that checked in."""
        try:
            self.store.add(_LEFT, 1)
            if self.machine_rank == 0:
                joined = sum(self.store.check([f"lgd/machine/{m}"]) for m in range(self.num_machines))
                deadline = time.monotonic() + _LINGER_S
                while self.store.add(_LEFT, 0) < joined and time.monotonic() < deadline:
                    time.sleep(0.1)
        except dist.DistError:
            pass


def _run(job: Rendezvous, worker, num_processes: int, use_cuda: bool, args: tuple):
    def who(index: int) -> str:
        if job.num_machines == 1:
            return f"process {index}"
        return f"machine {job.machine_rank}, rank {job.machine_rank * num_processes + index}"

    with tempfile.TemporaryDirectory(prefix="lgd-launch-") as records:
        context = mp.start_processes(
            _distributed_worker, nprocs=num_processes, join=False, start_method="spawn",
            args=(worker, job.host, job.port, job.num_machines * num_processes, num_processes, job.machine_rank,
                  use_cuda, records, args))
        try:
            # grace_period: processes stopping by themselves (a SIGTERM checkpoint) are not cut short.
            while not context.join(timeout=_POLL_S, grace_period=2.0):
                remote = job.failure()
                if remote is not None:
                    _kill(context)
                    raise remote
        except mp.ProcessRaisedException as exc:
            index = exc.error_index
            error = _raised_error(Path(records), index, str(exc), who(index))
            foreign = not (Path(records) / f"{index}.json").is_file()
            # A process that lost a peer of this machine in a collective fails too, sometimes first:
            # the peer's own record says why.
            cause = next((i for i in range(num_processes) if (Path(records) / f"{i}.json").is_file()), None)
            if foreign and cause is not None:
                error, foreign = _raised_error(Path(records), cause, "", who(cause)), False
        except mp.ProcessExitedException as exc:
            error, foreign = _exited_error(exc.error_index, exc.exit_code, who(exc.error_index)), False
        else:
            return job.result()
    if foreign and job.num_machines > 1:
        # Not an lgd error: most often a collective that lost a peer; the peer's own failure says why.
        deadline = time.monotonic() + _CAUSE_WAIT_S
        while time.monotonic() < deadline:
            cause = job.failure()
            if cause is not None:
                raise cause
            time.sleep(0.1)
    raise job.publish(error)


def _kill(context) -> None:
    for process in context.processes:
        if process.is_alive():
            process.kill()  # the job is lost: a checkpoint would need the peers that are gone
        process.join()


def _port_open(host: str, port: int, deadline: float) -> bool:
    """Whether HOST:PORT accepts a connection before `deadline` (polled quietly, unlike TCPStore's retries)."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if "message: " in text:  # c10d's socket errors end in the system's own words
        return text.rsplit("message: ", 1)[1].splitlines()[0]
    return text.splitlines()[0] if text else type(exc).__name__


def _difference(low: int, high: int, a: dict, b: dict) -> str | None:
    """What machines `low` and `high` (options `a` and `b`) were started with differently, or None."""
    for key in sorted(a.keys() | b.keys()):
        if key == "config" or a.get(key) == b.get(key):
            continue
        return f"machine {low} was started with {key} {a.get(key)}, machine {high} with {key} {b.get(key)}"
    ca, cb = a.get("config", {}), b.get("config", {})
    keys = sorted(k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k))
    if keys:
        shown = "; ".join(f"{k} {ca.get(k)} vs {cb.get(k)}" for k in keys[:3])
        more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
        return f"machine {low} and machine {high} have different configs: {shown}{more}"
    return None


def _record(error: LGDError, message: str) -> str:
    return json.dumps({"module": type(error).__module__, "name": type(error).__name__, "message": message,
                       "hint": error.hint, "exit_code": error.exit_code})


def _rebuild(record: dict) -> LGDError:
    """The LGDError a record describes, of its own class where that is one of lgd's."""
    cls = LGDError
    if record.get("module", "").startswith("lgd_cli."):
        try:
            found = getattr(importlib.import_module(record["module"]), record["name"])
            if isinstance(found, type) and issubclass(found, LGDError):
                cls = found
        except (ImportError, AttributeError):
            pass
    return cls(record["message"], hint=record.get("hint"), exit_code=record.get("exit_code"))


def _raised_error(errors: Path, index: int, trace: str, who: str | None = None) -> LGDError:
    """The error process `index` (named `who`) raised, rebuilt from the record it left, or its traceback's last line."""
    who = who or f"process {index}"
    subject = f"training {who}" if who.startswith("process") else who
    try:
        record = json.loads((errors / f"{index}.json").read_text())
    except (OSError, ValueError):
        record = None  # not an LGDError: the traceback it printed is all there is
    if record is not None:
        return _rebuild({**record, "message": f"{who}: {record['message']}"})
    if logging.getLogger("lgd_cli").isEnabledFor(logging.DEBUG):  # lgd --debug
        return LGDError(f"{subject} failed:{trace}")
    last = trace.strip().splitlines()[-1] if trace.strip() else "no message"
    return LGDError(f"{subject} failed: {last}", hint="run with --debug for its traceback")


def _exited_error(index: int, exit_code: int, who: str | None = None) -> LGDError:
    who = who or f"process {index}"
    subject = f"training {who}" if who.startswith("process") else who
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        hint = ("SIGKILL from outside is often the kernel's out-of-memory killer (see `dmesg`): fewer "
                "DATALOADER.NUM_WORKERS or a smaller batch use less memory" if -exit_code == signal.SIGKILL else None)
        return LGDError(f"{subject} was killed by {name}", hint=hint, exit_code=128 - exit_code)
    return LGDError(f"{subject} exited with code {exit_code}", exit_code=exit_code)


def _distributed_worker(local_rank, worker, host, port, world_size, num_per_machine, machine_rank, use_cuda,
                        errors, args):
    _compat.fork_data_workers()
    rank = machine_rank * num_per_machine + local_rank
    try:
        if use_cuda:
            torch.cuda.set_device(local_rank)  # before NCCL's set-up, which otherwise guesses the device
        store = dist.TCPStore(host, port, is_master=False, timeout=_OP_TIMEOUT)
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, world_size=world_size, rank=rank,
                                timeout=_OP_TIMEOUT)
        # detectron2's comm.get_local_rank() reads this group; its own launch() creates it.
        for machine in range(world_size // num_per_machine):
            ranks = list(range(machine * num_per_machine, (machine + 1) * num_per_machine))
            group = dist.new_group(ranks)
            if machine == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
        comm.synchronize()
        value = worker(*args)
        if rank == 0:
            try:
                store.set(_RESULT, json.dumps(value))
            except dist.DistError:
                pass  # the launcher that would read it is gone (killed); the run's files are written
        comm.synchronize()  # nobody leaves before the main process has written the run's last files
    except LGDError as exc:
        # The launcher sees only a traceback; this record lets it raise the same error.
        record = {"module": type(exc).__module__, "name": type(exc).__name__, "message": exc.message,
                  "hint": exc.hint, "exit_code": exc.exit_code}
        (Path(errors) / f"{local_rank}.json").write_text(json.dumps(record))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

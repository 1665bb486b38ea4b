"""Distributed harness shared by every stage: rank discovery, DeepSpeed init, rank-0 logging, stop flag.

Works under the `deepspeed` launcher (which passes --local_rank), torchrun, srun (SLURM_PROCID /
SLURM_LOCALID / SLURM_NTASKS) and mpirun (OMPI_COMM_WORLD_* or mpi4py discovery), on CPU (gloo)
and GPU (nccl) alike.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import torch

from maskprune.config import LauncherConfig
from maskprune.watchdog import WATCHDOG

T = TypeVar("T")

_ENV_MAPS = (
    # (rank, local rank, world size) variable names of each launcher, most specific first
    ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
    ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def discover_ranks(env: dict[str, str] | None = None) -> tuple[int, int, int, str]:
    """(rank, local_rank, world_size, source) from whichever launcher set its variables."""
    env = dict(os.environ if env is None else env)
    for rank_key, local_key, size_key in _ENV_MAPS:
        if rank_key in env and size_key in env:
            return int(env[rank_key]), int(env.get(local_key, 0)), int(env[size_key]), rank_key
    return 0, 0, 1, "single"


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def init_distributed(hang_timeout_minutes: float = LauncherConfig.hang_timeout_minutes) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed with env:// for whatever launched us, and arm
    this rank's progress watchdog (maskprune.watchdog) with `launcher.hang_timeout_minutes`."""
    if not on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    rank, local_rank, world_size, source = discover_ranks()
    if source not in ("RANK", "single"):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if source == "single":
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    # A hang fails loudly (every thread's stack) rather than eating the job's time limit; each step
    # and long operation pets it, so a job that progresses runs as long as it needs.
    WATCHDOG.arm(hang_timeout_minutes * 60, "init_distributed")
    if on_gpu():
        # Before the process group: NCCL binds each rank's communicator to the current device, and
        # every rank would otherwise create a context on GPU 0.
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo",
                                   auto_mpi_discovery=False,
                                   timeout=collective_timeout(hang_timeout_minutes))
    if on_gpu():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        atexit.register(remove_own_shm_buffer, torch.distributed.get_rank())
    return DistInfo(rank=torch.distributed.get_rank(), local_rank=local_rank,
                    world_size=torch.distributed.get_world_size(), device=device)


def collective_timeout(hang_timeout_minutes: float) -> datetime.timedelta:
    """The process group's timeout: a minute past the watchdog's, so a rank stuck in a collective is
    reported by its watchdog, with stacks, rather than by an exception from inside the collective."""
    return datetime.timedelta(minutes=hang_timeout_minutes + 1)


def broadcast_from_rank0(value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object); the value itself outside a job."""
    if not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def exit_rank(code: int) -> NoReturn:
    """End this rank with `code`, after the exit handlers, without interpreter finalization.

    A rank that finishes while a peer is still working (rank 1 exits while rank 0 writes the stage's
    outputs) sometimes aborted in C++ static destruction of its live gloo connections ("terminate
    called without an active exception", exit -6), failing a stage whose work was done; destroying
    the process group first did not prevent it. Nothing is left to do at that point, so skip it.
    Measured with two bare gloo ranks on CPU (torch 2.13, session 43): rank 0 leaving by sys.exit(2)
    while rank 1 still held its connections aborted in 3 of 12 runs (exit 134), by this path in 0
    of 12; the rank left behind never aborted. Every stage rank leaves this way (stage.run_stage)."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def remove_own_shm_buffer(global_rank: int) -> None:
    """DeepSpeed's CPU all-reduce maps this rank's buffer (launcher.shm_buffers) and never unlinks
    it; whatever launched the job, left alone they add up
    until the machine runs out. Unlinked at exit: the other ranks mapped it inside init, long ago."""
    from maskprune.launcher import shm_buffers

    for path in shm_buffers(os.environ.get("MASTER_PORT", "*"), global_rank):
        path.unlink(missing_ok=True)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def log(message: str) -> None:
    """Rank-0 log line with a timestamp, flushed so launcher logs interleave sanely."""
    if rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stdout, flush=True)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# EX_TEMPFAIL: a stage stopped on request after its last checkpoint (or finished part); run again to resume.
PREEMPTED_EXIT_CODE = 75


class StopFlag:
    """Preemption: SIGUSR1 / SIGTERM or a stop file sets a local flag; `should_stop()` all-reduces it
    at a step boundary so every rank stops after the same step and all save the same checkpoint."""

    def __init__(self, stop_file: Path | None = None):
        self.stop_file = stop_file
        self._local = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self._local = True

    def should_stop(self) -> bool:
        local = self._local or bool(self.stop_file and self.stop_file.exists())
        flag = torch.tensor([1.0 if local else 0.0], device="cuda" if on_gpu() else "cpu")
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)


def stage_argv_parser(description: str):
    """The argument parser every stage script shares: --run-dir plus the launcher's --local_rank."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run-dir", required=True, help="run directory made by `maskprune run`")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--run-lock", type=_inherit_run_lock, help=argparse.SUPPRESS)
    return parser


def _inherit_run_lock(token: str) -> str:
    """`maskprune run` passes its run-directory lock token on the command line as well as in
    MASKPRUNE_RUN_LOCK: a multi-node deepspeed launch over pdsh passes on only some variables."""
    from maskprune.runlock import TOKEN_ENV

    os.environ[TOKEN_ENV] = token
    return token


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Full `params` for the duration (every rank must enter); a no-op for parameters ZeRO-3 does not own."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield

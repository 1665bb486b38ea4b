"""Stage processes die with whatever launched them, so a killed `maskprune run` or launcher never
leaves ranks writing into a run directory nobody owns.

Two mechanisms, because PR_SET_PDEATHSIG only covers the direct parent:
- `die_with_parent_preexec(pid)`: run in the child between fork and exec by `maskprune run`, so the
  stage's launcher (deepspeed runner, srun, or the single-process stage) gets SIGKILL when it dies;
- `follow_launchers(script)`: every stage process sets PR_SET_PDEATHSIG against its parent when the
  parent is part of the job, and a daemon thread watches the rest of the chain (the deepspeed runner
  above `deepspeed.launcher.launch`, the orchestrator named in MASKPRUNE_ORCHESTRATOR on this
  host): when one is gone the process removes its shared-memory buffer and exits at once.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from maskprune.runlock import process_start_ticks

PR_SET_PDEATHSIG = 1
ORCHESTRATOR_ENV = "MASKPRUNE_ORCHESTRATOR"  # "host pid start_ticks" of the `maskprune run` process
POLL_S = 0.5


def set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def die_with_parent_preexec(parent_pid: int):
    """A subprocess preexec_fn: SIGKILL this child when `parent_pid` dies (and now, if it already has)."""
    def preexec() -> None:
        set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(137)

    return preexec


def orchestrator_env() -> dict[str, str]:
    return {ORCHESTRATOR_ENV: f"{socket.gethostname()} {os.getpid()} {process_start_ticks(os.getpid())}"}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def running(pid: int, ticks: int | None) -> bool:
    """`pid` is still the process that started at `ticks`, and not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and int(fields[19]) == ticks


def job_ancestors(script: str) -> list[tuple[int, int | None]]:
    """(pid, start ticks) of the ancestors of this process that belong to the job: those whose
    command line names the stage script (launch.py, the deepspeed runner, srun's wrapper) and the
    orchestrator of MASKPRUNE_ORCHESTRATOR when it runs on this host."""
    chain = []
    pid = os.getppid()
    while pid > 1 and script.endswith(".py"):
        if script in _cmdline(pid):
            chain.append((pid, process_start_ticks(pid)))
        pid = _ppid(pid)
    host, _, rest = os.environ.get(ORCHESTRATOR_ENV, "").partition(" ")
    if host == socket.gethostname() and rest:
        pid_text, _, ticks = rest.partition(" ")
        chain.append((int(pid_text), int(ticks) if ticks.isdigit() else None))
    return chain


def _exit_orphaned(pid: int) -> None:
    print(f"[maskprune] rank {os.environ.get('RANK', 0)}: launcher pid {pid} is gone; exiting",
          file=sys.stderr, flush=True)
    if "RANK" in os.environ and "MASTER_PORT" in os.environ:
        from maskprune.launcher import shm_buffers

        for path in shm_buffers(os.environ["MASTER_PORT"], os.environ["RANK"]):
            path.unlink(missing_ok=True)
    os._exit(137)


def follow_launchers(script: str) -> None:
    """Exit when a launcher of this stage process is gone (see the module docstring)."""
    chain = job_ancestors(script)
    if chain and chain[0][0] == os.getppid():
        set_pdeathsig(signal.SIGKILL)
    if not chain:
        return

    def watch() -> None:
        while True:
            for pid, ticks in chain:
                if not running(pid, ticks):
                    _exit_orphaned(pid)
            time.sleep(POLL_S)

    threading.Thread(target=watch, name="maskprune-lifeline", daemon=True).start()

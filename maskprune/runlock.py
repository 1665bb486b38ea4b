"""One owner per run directory: an exclusive lock on `RUN/.lock`, held by `maskprune run` for its
whole life and by any stage job started without it (`deepspeed pipeline/stage_*.py --run-dir RUN`).

    lock = acquire_run_lock(Path("runs/tiny"))   # before anything in RUN is read or written

The lock is `flock(2)` on RUN/.lock; the file says who holds it (host, pid, since, token). The
kernel (or the NFS server) drops a flock when its holder dies, so a holder killed with SIGKILL never
blocks the next run; the next holder finds the old text still in the file and says it took over.
A stage job started by `maskprune run` does not lock again: the orchestrator passes its token in
MASKPRUNE_RUN_LOCK (and to distributed stages as `--run-lock TOKEN`), and the stage's global rank 0
checks that the file still names that token.

Where flock is unsupported (ENOLCK / EOPNOTSUPP / ENOSYS: NFS without a lock manager, Lustre
mounted without `flock`), the lock falls back to creating `RUN/.lock.owner` with O_EXCL: a holder
on this host that is gone is taken over; one on another host must be cleared by hand (the message
says how), because its liveness cannot be checked from here.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from maskprune.rundir import RunDirError

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"  # the O_EXCL fallback's lock file
TOKEN_ENV = "MASKPRUNE_RUN_LOCK"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunLockError(RunDirError):
    """The run directory is owned by another live job; the message names it and what to do."""


def process_start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (tells a live holder from a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def holder_alive(holder: dict) -> bool:
    """Only answerable for a holder on this host."""
    pid = int(holder.get("pid", 0))
    return pid > 0 and process_start_ticks(pid) == holder.get("start_ticks")


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {since})"


def read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@dataclass
class RunLock:
    path: Path  # the file naming the holder
    token: str
    fd: int | None  # the flock'ed descriptor; None when inherited or in the O_EXCL fallback
    owned: bool  # False: inherited from the orchestrator, which releases it

    def child_env(self) -> dict[str, str]:
        """What a stage job started by the holder needs to know it runs under this lock."""
        return {TOKEN_ENV: self.token}

    def child_args(self) -> list[str]:
        """The same for a distributed stage script (dist.stage_argv_parser), whose launcher may not
        pass the environment on to other nodes."""
        return ["--run-lock", self.token]

    def release(self) -> None:
        """Empty the holder record (an empty file is a free lock), then drop the lock."""
        if not self.owned:
            return
        self.owned = False
        if self.fd is None:  # fallback: the file itself is the lock
            if read_holder(self.path).get("token") == self.token:
                self.path.unlink(missing_ok=True)
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _holder_record(token: str, role: str) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                       "start_ticks": process_start_ticks(os.getpid()), "token": token, "role": role})


def _refusal(root: Path, holder: dict, clear: str) -> RunLockError:
    return RunLockError(f"{root} is in use by {holder.get('role', 'another maskprune job')}, "
                        f"{describe(holder)}; wait for it to end or stop it (kill -USR1 "
                        f"{holder.get('pid', 'PID')}{' on ' + str(holder['host']) if 'host' in holder else ''})"
                        f", or use another --run-dir{clear}")


def _say(message: str) -> None:
    print(f"[maskprune] {message}", file=sys.stderr, flush=True)


def acquire_run_lock(root: Path, role: str = "maskprune run") -> RunLock:
    """Lock `root` (created if missing) for this process, or raise RunLockError naming the holder.
    A token in MASKPRUNE_RUN_LOCK that the lock file names means our launcher holds it for us."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    inherited = os.environ.get(TOKEN_ENV)
    if inherited:
        for candidate in (path, root / OWNER_NAME):
            if read_holder(candidate).get("token") == inherited:
                return RunLock(candidate, inherited, None, owned=False)
    token = uuid.uuid4().hex
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _refusal(root, read_holder(path), "") from None
    except OSError as err:
        os.close(fd)
        if err.errno not in UNSUPPORTED:
            raise
        _say(f"{path}: the file system does not support flock ({os.strerror(err.errno)}); "
             f"using {OWNER_NAME} created with O_EXCL instead")
        return _acquire_exclusive(root, token, role)
    previous = read_holder(path)
    if previous:
        _say(f"{root}: taking over the lock of {describe(previous)}, which ended without releasing it")
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_record(token, role).encode(), 0)
    os.fsync(fd)
    return RunLock(path, token, fd, owned=True)


def _acquire_exclusive(root: Path, token: str, role: str) -> RunLock:
    path = root / OWNER_NAME
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            if holder.get("host") != socket.gethostname():
                raise _refusal(root, holder, f"; if that job is gone, delete {path}") from None
            if holder_alive(holder):
                raise _refusal(root, holder, "") from None
            _say(f"{root}: taking over the lock of {describe(holder)}, which is no longer running")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(_holder_record(token, role))
            handle.flush()
            os.fsync(handle.fileno())
        return RunLock(path, token, None, owned=True)
    raise RunLockError(f"{path}: could not create it after removing a stale one; another job is "
                       "starting in the same run directory")

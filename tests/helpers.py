"""Shared test plumbing: run the CLI or a DeepSpeed job as a subprocess with a hard timeout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 900, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "maskprune"), *args], cwd=REPO, env=cpu_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"maskprune {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_deepspeed(script: Path, *args: str, ranks: int = 2, timeout: float = 600,
                  check: bool = True, clean_shm: bool = True, **env: str) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N script args` on CPU ranks; a hang fails at `timeout` instead of hanging CI.
    `clean_shm`: remove the job's /dev/shm all-reduce buffers afterwards (ranks killed before their
    own exit cleanup leave them)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
            str(script), *args]
    from maskprune.launcher import remove_shm_buffers

    try:
        proc = subprocess.run(argv, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True,
                              timeout=timeout)
    finally:
        if clean_shm:
            remove_shm_buffers(argv)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_processes(run_dir: Path) -> list:
    """Every live process of a run, whatever session it is in: those whose command line names the
    run directory (`maskprune run`, the deepspeed runner and launch.py, each rank, single-process
    stages and their worker pools). psutil.Process objects, zombies left out."""
    import psutil

    names = {str(run_dir), str(Path(run_dir).resolve())}
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.pid != os.getpid() and \
                any(name in cmdline for name in names):
            found.append(proc)
    return found


def wait_until_gone(run_dir: Path, timeout: float = 15) -> list:
    """Wait (up to `timeout` s) for every process of the run to end; returns those still alive."""
    import time

    deadline = time.monotonic() + timeout
    while (left := run_processes(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left

"""Shared test plumbing: run the CLI or a DeepSpeed job as a subprocess with a hard timeout; a run
directory recorded done with training checkpoints in it."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from maskprune.config import load_config
from maskprune.rundir import STAGES, RunDir

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.update(extra)
    return env


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of `size` at `path` (tmpfs: mounting needs root, as CI has; skips otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def run_cli(*args: str, timeout: float = 900, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "maskprune"), *args], cwd=REPO, env=cpu_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"maskprune {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def kill_run_after_step(run_dir: Path, stage: str, step: int, *args: str, timeout: float = 600) -> None:
    """`maskprune run ARGS` killed (SIGKILL to every rank and the launcher) once `stage` reports `step`."""
    import json
    import signal
    import time

    proc = subprocess.Popen([str(BIN / "maskprune"), "run", *args], cwd=REPO, env=cpu_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = run_dir / stage / "progress.json"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if progress.is_file() and json.loads(progress.read_text())["step"] >= step:
                return
            assert proc.poll() is None, "the stage ended before it could be killed"
            time.sleep(0.2)
        raise AssertionError(f"{stage} did not reach step {step} within {timeout} s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


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


def checkpoint(root: Path, tag: str, size: int) -> Path:
    folder = root / tag
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * size)
    return folder


def run_with_checkpoints(tmp_path: Path, until: str = "evaluate") -> RunDir:
    """configs/tiny.toml's stages recorded done up to `until`, with mask_learn's two checkpoints,
    continued_pretrain's two (step 20 is its final) and a universal copy of step 10."""
    cfg = load_config(REPO / "configs" / "tiny.toml")
    run = RunDir(tmp_path / "run")
    run.write_config(cfg)
    ml_root, cpt_root = run.stage_dir("mask_learn") / "checkpoints", run.stage_dir("continued_pretrain") / "checkpoints"
    for tag in ("step00000010", "step00000020"):
        checkpoint(ml_root, tag, 1000)
        checkpoint(cpt_root, tag, 3000)
    checkpoint(cpt_root / "universal", "step00000010", 500)
    (cpt_root / "latest").write_text("step00000020")
    outputs = {"mask_learn": {"masks": str(run.stage_dir("mask_learn") / "masks.safetensors")},
               "continued_pretrain": {"checkpoints": str(cpt_root), "final_tag": "step00000020"}}
    for stage in STAGES[:STAGES.index(until) + 1]:
        run.mark_running(stage, cfg)
        run.mark_done(stage, outputs.get(stage, {}))
    return run


def peak_allocated_bytes(work: Callable[[], object]) -> int:
    """The peak of what `work` allocates on the CPU and has not freed, from torch's memory profiler
    (exact, unlike RSS: no allocator caching, no other threads)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        work()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak

"""How `maskprune run` starts each stage: an argv list (never a shell string) and its environment."""
from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path

from maskprune.config import LauncherConfig

PIPELINE_DIR = Path(__file__).resolve().parent.parent / "pipeline"
LAUNCH_DIR = Path(__file__).resolve().parent.parent / "launch"

# Stages that run under the distributed launcher; the rest are single-process.
DISTRIBUTED_STAGES = {"mask_learn", "continued_pretrain"}


def stop_file_path(run_root: Path) -> Path:
    """`RUN/STOP`: a stop request. Every rank's `StopFlag(stop_file=...)` checks it at a step boundary;
    `maskprune run` starts no further stage while it exists and removes it when it starts."""
    return Path(run_root) / "STOP"


def stage_script(stage: str) -> Path:
    return PIPELINE_DIR / f"stage_{stage}.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(name: str) -> str:
    """The launcher next to this interpreter (a venv's bin/), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def stage_command(stage: str, run_dir: Path, launcher: LauncherConfig) -> list[str]:
    script = str(stage_script(stage))
    tail = [script, "--run-dir", str(run_dir)]
    if stage not in DISTRIBUTED_STAGES or launcher.kind == "none":
        return [sys.executable, *tail]
    port = str(launcher.master_port or free_port())
    nodes, gpus = str(launcher.num_nodes), str(launcher.num_gpus)
    if launcher.kind == "srun":
        # One task per node; the wrapper adds that node's --node_rank, the hostfile and master address.
        return [_tool("srun"), f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
                "--kill-on-bad-exit=1",
                str(LAUNCH_DIR / "node_rank_wrapper.sh"), gpus, _tool("deepspeed"), "--num_nodes",
                nodes, "--num_gpus", gpus, "--master_port", port, *tail]
    if launcher.kind == "srun_tasks":
        # One task per rank; the wrapper maps SLURM_* to RANK / LOCAL_RANK / WORLD_SIZE / MASTER_*.
        ranks = str(launcher.num_nodes * launcher.num_gpus)
        return [_tool("srun"), f"--nodes={nodes}", f"--ntasks={ranks}", f"--ntasks-per-node={gpus}",
                "--kill-on-bad-exit=1",
                str(LAUNCH_DIR / "task_rank_wrapper.sh"), port, sys.executable, *tail]
    if launcher.kind == "torchrun":
        return [_tool("torchrun"), f"--nproc_per_node={launcher.num_gpus}",
                f"--nnodes={launcher.num_nodes}", f"--master_addr={launcher.master_addr}",
                f"--master_port={port}", *tail]
    argv = [_tool("deepspeed"), "--num_gpus", str(launcher.num_gpus), "--master_port", port]
    if launcher.hostfile:
        argv += ["--hostfile", launcher.hostfile, "--num_nodes", str(launcher.num_nodes),
                 "--master_addr", launcher.master_addr]
    return argv + tail


def clear_stale_extension_locks(root: Path, older_than_s: float = 1800) -> list[Path]:
    """A JIT build killed mid-way leaves a `lock` file that hangs every later start."""
    removed = []
    for lock in root.glob("*/lock"):
        if time.time() - lock.stat().st_mtime > older_than_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


def stage_env(launcher: LauncherConfig, stage: str) -> dict[str, str]:
    env = dict(os.environ)
    if stage in DISTRIBUTED_STAGES:
        # N ranks on one machine each with every core's worth of threads run ~6x slower on CPU.
        env["OMP_NUM_THREADS"] = str(launcher.omp_num_threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    ext = Path(env.setdefault("TORCH_EXTENSIONS_DIR",
                              str(Path.home() / ".cache" / "maskprune" / "torch_extensions")))
    ext.mkdir(parents=True, exist_ok=True)
    clear_stale_extension_locks(ext)
    return env


def shm_buffers(port: str, rank: int | str = "*") -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers of the job on `port` (one rank's, or all):
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, 69 MB each, memory-backed."""
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_{rank}"))


def remove_shm_buffers(argv: list[str]) -> None:
    """The all-reduce buffers of a finished job: each rank unlinks its own at exit
    (dist.init_distributed), but a rank killed (SIGKILL, OOM, a fault test) leaves its own behind."""
    ports = [a.split("=", 1)[1] for a in argv if a.startswith("--master_port=")]
    ports += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--master_port"]
    for port in ports:
        for path in shm_buffers(port):
            path.unlink(missing_ok=True)

"""Slow tier: a real single-host Slurm (munged, slurmctld, two `slurmd -N` nodes; tests/slurm/
start_slurm.sh) runs launch/pipeline.sbatch across the two nodes, with tests/slurm/srun_driver.py
standing in for `maskprune run` (it builds the driver's srun command and runs it with a recorder in
place of deepspeed), and is preempted once through the USR1 path. Skipped without root or the
Debian packages `munge slurmctld slurmd slurm-client`."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from helpers import BIN, REPO
from slurm_fixture import SLURM_DIR, RequeueStarter, job_field, slurm  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow


def job_env(slurm, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "MASKPRUNE_"))}
    env.update(SLURM_CONF=slurm["SLURM_CONF"], PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               MASKPRUNE_BIN=str(SLURM_DIR / "srun_driver.py"), MASKPRUNE_HOSTFILE_DIR=str(tmp_path))
    env.update(extra)
    return env


def records(path: Path, tool: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if tool is None or r.get("tool") == tool]


def test_per_node_deepspeed_launch_on_two_nodes(slurm, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.run(["sbatch", "--wait", "--nodes=2", f"--output={run}/job.out",
                           "launch/pipeline.sbatch", "cfg.toml", str(run)],
                          cwd=REPO, env=job_env(slurm, tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (run / "job.out").read_text()
    job = proc.stdout.split()[-1]
    launched = sorted(records(run / "calls.jsonl", "deepspeed"), key=lambda r: r["env"]["SLURM_NODEID"])
    assert len(launched) == 2
    for node, call in enumerate(launched):
        assert call["env"]["SLURM_NODEID"] == str(node)
        assert call["argv"][:7] == ["--hostfile", str(tmp_path / f"maskprune-hostfile.{job}.0.{node}"),
                                    "--no_ssh", "--node_rank", str(node), "--master_addr", "n1"]
        assert call["argv"][7:11] == ["--num_nodes", "2", "--num_gpus", "1"]
        assert call["hostfile"] == "n1 slots=1\nn2 slots=1\n"


def test_per_gpu_tasks_on_two_nodes(slurm, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    env = job_env(slurm, tmp_path, MASKPRUNE_LAUNCH="per_gpu", MASKPRUNE_GPUS_PER_NODE="2")
    proc = subprocess.run(["sbatch", "--wait", "--nodes=2", f"--output={run}/job.out",
                           "launch/pipeline.sbatch", "cfg.toml", str(run)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (run / "job.out").read_text()
    ranks = sorted((r["env"]["RANK"], r["env"]["LOCAL_RANK"], r["env"]["WORLD_SIZE"], r["env"]["NODE_RANK"],
                    r["env"]["MASTER_ADDR"]) for r in records(run / "calls.jsonl", "rank"))
    assert ranks == [("0", "0", "4", "0", "n1"), ("1", "1", "4", "0", "n1"),
                     ("2", "0", "4", "1", "n1"), ("3", "1", "4", "1", "n1")]


def test_usr1_before_the_time_limit_requeues_and_the_job_resumes(slurm, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    env = job_env(slurm, tmp_path, DRIVER_WAIT_STOP="1")
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={run}/job.out",
                           "launch/pipeline.sbatch", "cfg.toml", str(run)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    deadline = time.time() + 60
    while not (run / "driver_started").exists():
        assert time.time() < deadline, (run / "job.out").read_text()
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@300` does 300 s before the time limit.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    deadline, starter = time.time() + 90, RequeueStarter(slurm, job)
    while (state := job_field(slurm, job, "JobState")) != "COMPLETED":
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT"), (run / "job.out").read_text()
        assert time.time() < deadline, f"{state}\n{(run / 'job.out').read_text()}"
        starter.poll(state)  # a requeued job waits ~2 min (BeginTime); start it sooner
        time.sleep(0.5)
    starts = records(run / "driver.jsonl")
    assert [s["restart"] for s in starts] == [0, 1]
    assert not any(s["stop_at_start"] for s in starts)  # the requeued job removed RUN/STOP first
    assert job_field(slurm, job, "Restarts") == "1"
    log = (run / "job.out").read_text()
    assert f"requeueing job {job} (restart 1)" in log
    assert len(records(run / "calls.jsonl", "deepspeed")) == 4  # the stage ran on both nodes, twice

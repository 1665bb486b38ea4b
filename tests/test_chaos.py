"""Chaos: the tiny pipeline (mask_learn onwards) is started, and at 5 random moments a random process
of it (the orchestrator, the deepspeed launcher, one rank, hard_prune, the export) gets SIGKILL;
after each, once every process of the run is gone, the same command runs again. At the end nothing
of the run is left running, every stage is done, and the final model is bit-identical to an
uninterrupted run's.

Seeded: MASKPRUNE_CHAOS_SEED=N replays the same choices of victims and delays (the moments they
land on still depend on the machine's speed).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import copy_run
from helpers import BIN, REPO, cpu_env, run_cli, run_processes, wait_until_gone
from maskprune.rundir import STAGES, RunDir
from test_faults import SETTINGS, assert_identical

# The uninterrupted run plus ~6 restarts of the pipeline: ~15 min on an idle 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(5400)]

SEED = int(os.environ.get("MASKPRUNE_CHAOS_SEED", time.time_ns() % 10_000))
KILLS = 5
ROLES = ("orchestrator", "launcher", "rank", "hard_prune", "export")
MAX_INVOCATIONS = 12  # kills + the final run, with room for runs that ended before their kill landed


def run_argv(run_dir: Path) -> list[str]:
    return [str(BIN / "maskprune"), "run", "configs/tiny.toml", "--run-dir", str(run_dir),
            *[x for s in SETTINGS for x in ("--set", s)]]


def role_of(proc: psutil.Process, orchestrator: int, run_dir: Path) -> str | None:
    """What a process of the run is, from its command line: 'orchestrator', 'launcher' (the deepspeed
    runner or launch.py), 'rank', 'export' (the export stage, or continued_pretrain's rank 0 once its
    training is over), or a single-process stage's name."""
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return None
    if proc.pid == orchestrator:
        return "orchestrator"
    stage = re.search(r"stage_(\w+)\.py", cmdline)
    if "--local_rank" in cmdline:
        if stage and stage[1] == "continued_pretrain" and "--local_rank=0" in cmdline and training_over(run_dir):
            return "export"
        return "rank"
    if "deepspeed" in cmdline:
        return "launcher"
    return stage[1] if stage else None


def training_over(run_dir: Path) -> bool:
    try:
        progress = json.loads((run_dir / "continued_pretrain" / "progress.json").read_text())
    except (OSError, ValueError):
        return False
    return progress["step"] >= progress["steps"]


def alive_by_role(run_dir: Path, orchestrator: int) -> dict[str, list[psutil.Process]]:
    roles: dict[str, list[psutil.Process]] = {}
    for proc in run_processes(run_dir):
        role = role_of(proc, orchestrator, run_dir)
        if role:
            roles.setdefault(role, []).append(proc)
    return roles


# The stage each role lives in, and how long after it appears the kill may come (seconds): long
# enough to land mid-training or mid-checkpoint, short enough for the export's few seconds.
ROLE_STAGE = {"launcher": "continued_pretrain", "rank": "continued_pretrain", "hard_prune": "hard_prune",
              "export": "export" if "export" in STAGES else "continued_pretrain", "orchestrator": "evaluate"}
ROLE_DELAY_S = {"orchestrator": 30.0, "launcher": 20.0, "rank": 20.0, "hard_prune": 5.0, "export": 0.5}


def roles_left(run_dir: Path) -> list[str]:
    """The roles that can still appear: those whose stage is not done yet."""
    run = RunDir(run_dir)
    return [role for role in ROLES if run.state(ROLE_STAGE[role]).status != "done"] or ["orchestrator"]


def kill_someone(run_dir: Path, proc: subprocess.Popen, rng: random.Random, log: list[str]) -> bool:
    """Kill one process of the running invocation `proc` with SIGKILL, a random delay after a process
    of a randomly chosen role appeared (any process of the run if that role's stage ended first);
    False if the invocation ended before."""
    wanted = rng.choice(roles_left(run_dir))
    delay = rng.uniform(0.0, ROLE_DELAY_S[wanted])
    deadline = time.monotonic() + 1200
    while proc.poll() is None and time.monotonic() < deadline:
        if wanted in alive_by_role(run_dir, proc.pid) or wanted not in roles_left(run_dir):
            break
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    alive = alive_by_role(run_dir, proc.pid)
    role = wanted if wanted in alive else rng.choice(sorted(alive))
    victim = rng.choice(sorted(alive[role], key=lambda p: p.pid))
    stages = {s: RunDir(run_dir).state(s).status for s in STAGES}
    running = next((s for s, status in stages.items() if status == "running"), "-")
    try:
        victim.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        return False
    log.append(f"SIGKILL {role} (wanted {wanted}) pid {victim.pid} {delay:.1f}s in, stage {running}")
    print(log[-1], flush=True)
    return True


@pytest.fixture(scope="module")
def uninterrupted(tiny_tokenized: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = copy_run(tiny_tokenized, tmp_path_factory.mktemp("chaos") / "uninterrupted")
    run_cli(*run_argv(run_dir)[1:], timeout=2400)
    return run_dir


def test_sigkill_at_five_random_moments_then_rerun_ends_bit_identical(uninterrupted: Path, tiny_tokenized: Path,
                                                                       tmp_path: Path) -> None:
    print(f"MASKPRUNE_CHAOS_SEED={SEED}", flush=True)
    rng = random.Random(SEED)
    run_dir = copy_run(tiny_tokenized, tmp_path / "run")
    kills: list[str] = []
    started = time.monotonic()
    try:
        for invocation in range(MAX_INVOCATIONS):
            with open(tmp_path / f"run{invocation}.log", "w") as handle:
                proc = subprocess.Popen(run_argv(run_dir), cwd=REPO, env=cpu_env(), stdout=handle,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            killed = len(kills) < KILLS and kill_someone(run_dir, proc, rng, kills)
            code = proc.wait(timeout=2400)
            left = wait_until_gone(run_dir, 20)
            assert not left, f"after {kills[-1:]}: left running {[' '.join(p.cmdline()) for p in left]}"
            if not killed:
                assert code == 0, (tmp_path / f"run{invocation}.log").read_text()[-4000:]
                break
        else:
            raise AssertionError(f"not finished after {MAX_INVOCATIONS} runs: {kills}")
    finally:
        for proc in run_processes(run_dir):
            proc.kill()
    print(f"chaos seed {SEED}: {len(kills)} kills, {invocation + 1} runs, "
          f"{time.monotonic() - started:.0f} s", flush=True)
    # Each run is killed unless it ends within seconds of starting, which only a run with nothing
    # left to do does: fewer than KILLS kills is possible, in principle, and not a failure.
    assert kills, "the pipeline was never killed"
    status = json.loads(run_cli("status", str(run_dir), "--json").stdout)
    assert all(stage["status"] == "done" for stage in status["stages"].values()), status
    reference = json.loads(run_cli("status", str(uninterrupted), "--json").stdout)["final_checkpoint"]
    final = Path(status["final_checkpoint"])
    assert final.relative_to(run_dir) == Path(reference).relative_to(uninterrupted)
    assert_identical(Path(reference), final)
    assert (run_dir / ".lock").read_text() == ""

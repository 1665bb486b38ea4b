"""One owner per run directory and no orphaned ranks, on the real pipeline (2 CPU ranks, ZeRO-3):
a second `maskprune run` on a busy run directory is refused; `kill -9` of `maskprune run` leaves no
runner or rank behind and the rerun resumes; Ctrl-C stops every rank at a step boundary with a
checkpoint (exit 3) and the rerun resumes from it."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import copy_run
from helpers import BIN, REPO, cpu_env, run_cli, run_processes, wait_until_gone
from maskprune.cli import EXIT_STOPPED
from maskprune.rundir import RunDir
from maskprune.runlock import read_holder

pytestmark = pytest.mark.slow

SETTINGS = ["mask_learn.train.steps=10", "mask_learn.train.checkpoint_every=5",
            "mask_learn.budget_warmup_fraction=0.3", "mask_learn.train.eval_every=10",
            "mask_learn.train.eval_batches=2"]


def run_argv(run_dir: Path) -> list[str]:
    return [str(BIN / "maskprune"), "run", "configs/tiny.toml", "--run-dir", str(run_dir), "--until",
            "mask_learn", *[x for s in SETTINGS for x in ("--set", s)]]


def start(run_dir: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(run_argv(run_dir), cwd=REPO, env=cpu_env(), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, log: Path) -> None:
    deadline = time.monotonic() + 900
    while True:
        try:
            done = json.loads((run_dir / "mask_learn" / "progress.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            done = -1
        if done >= step:
            return
        assert proc.poll() is None, f"run ended ({proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


@pytest.fixture()
def run_dir(tiny_tokenized: Path, tmp_path: Path):
    run_dir = copy_run(tiny_tokenized, tmp_path / "run")
    yield run_dir
    for proc in run_processes(run_dir):  # whatever a failed test left
        proc.kill()


def test_second_run_on_a_busy_run_dir_is_refused_in_one_line(run_dir: Path, tmp_path: Path) -> None:
    first = start(run_dir, tmp_path / "first.log")
    deadline = time.monotonic() + 120
    while read_holder(run_dir / ".lock").get("pid") != first.pid:
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.05)
    time.sleep(2)
    second = subprocess.run(run_argv(run_dir), cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"in use by maskprune run, pid {first.pid} on host {socket.gethostname()} (since " in lines[0]
    assert "wait for it to end" in lines[0] and f"kill -USR1 {first.pid}" in lines[0]
    assert "mask_learn: running" not in second.stdout
    assert first.wait(timeout=1500) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert RunDir(run_dir).state("mask_learn").status == "done"
    assert RunDir(run_dir).state("mask_learn").attempts == 1
    assert (run_dir / ".lock").read_text() == ""  # released


def test_kill_9_of_maskprune_run_leaves_no_rank_and_the_rerun_resumes(run_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "killed.log"
    proc = start(run_dir, log)
    wait_for_step(proc, run_dir, 6, log)
    job = [p for p in run_processes(run_dir) if p.pid != proc.pid]
    roles = [" ".join(p.cmdline()) for p in job]
    assert sum("--local_rank" in c for c in roles) == 2 and any("deepspeed" in c for c in roles), roles
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = wait_until_gone(run_dir, 10)
    assert not left, [" ".join(p.cmdline()) for p in left]

    out = run_cli(*run_argv(run_dir)[1:], timeout=1500)
    assert "taking over the lock of pid" in out.stderr  # the killed run never released it
    assert f"resumed from {run_dir / 'mask_learn' / 'checkpoints' / 'step00000005'} at step 5" in out.stdout
    state = RunDir(run_dir).state("mask_learn")
    assert state.status == "done" and state.attempts == 2
    assert not run_processes(run_dir)


def test_ctrl_c_stops_every_rank_at_a_step_boundary_with_a_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "interrupted.log"
    proc = start(run_dir, log)
    wait_for_step(proc, run_dir, 2, log)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the foreground group
    assert proc.wait(timeout=600) == EXIT_STOPPED, log.read_text()[-3000:]
    output = log.read_text()
    assert "Ctrl-C: stopping at the next step boundary" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    stopped = int(output.split("mask_learn: stop requested; checkpoint at step ")[1].split()[0])
    root = run_dir / "mask_learn" / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step{stopped:08d}"
    assert (root / f"step{stopped:08d}" / "COMPLETE").is_file()
    assert not wait_until_gone(run_dir, 10)

    out = run_cli(*run_argv(run_dir)[1:], timeout=1500)
    assert f"resumed from {root / f'step{stopped:08d}'} at step {stopped}" in out.stdout
    assert RunDir(run_dir).state("mask_learn").status == "done"

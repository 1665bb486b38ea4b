"""The progress watchdog on the real job (2 CPU ranks, ZeRO-3, `maskprune run`), with a 1-minute
launcher.hang_timeout_minutes: a stage that keeps stepping runs past it; a rank that stops (SIGSTOP)
fails the job within the timeout plus a minute, with stacks, and the same command then resumes."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import copy_run
from helpers import BIN, REPO, cpu_env, run_cli, run_processes, wait_until_gone
from test_faults import progress_step, rank_pid

pytestmark = pytest.mark.slow

LAUNCHER_GRACE_S = 30  # deepspeed.launcher.launch.terminate_process_tree: SIGTERM, wait, SIGKILL


def mask_learn_argv(run_dir: Path, steps: int, checkpoint_every: int) -> list[str]:
    settings = [f"mask_learn.train.steps={steps}", f"mask_learn.train.checkpoint_every={checkpoint_every}",
                "mask_learn.budget_warmup_fraction=0.13", f"mask_learn.train.eval_every={checkpoint_every}",
                "mask_learn.train.eval_batches=2", "launcher.hang_timeout_minutes=1"]
    return ["run", "configs/tiny.toml", "--run-dir", str(run_dir), "--until", "mask_learn",
            *[x for s in settings for x in ("--set", s)]]


def test_a_stage_that_keeps_stepping_outlives_the_hang_timeout(tiny_tokenized: Path, tmp_path: Path) -> None:
    # 15 steps of >= 12 s each (MASKPRUNE_TEST_STEP_DELAY_S): >= 3 min of training, 3x the timeout,
    # while no single step comes near it.
    run_dir = copy_run(tiny_tokenized, tmp_path / "run")
    started = time.monotonic()
    proc = run_cli(*mask_learn_argv(run_dir, steps=15, checkpoint_every=5), timeout=1200,
                   MASKPRUNE_TEST_STEP_DELAY_S="12")
    seconds = time.monotonic() - started
    print(f"mask_learn of 15 delayed steps under a 1-minute hang timeout: {seconds:.0f} s")
    assert seconds > 180
    assert "mask_learn step 15/15" in proc.stdout
    assert "maskprune: watchdog" not in proc.stdout + proc.stderr
    assert (run_dir / "mask_learn" / "masks.safetensors").is_file()


def test_a_stopped_rank_fails_the_job_with_stacks_and_the_rerun_resumes(tiny_tokenized: Path,
                                                                         tmp_path: Path) -> None:
    run_dir = copy_run(tiny_tokenized, tmp_path / "run")
    argv = [str(BIN / "maskprune"), *mask_learn_argv(run_dir, steps=16, checkpoint_every=3)]
    log = tmp_path / "stopped.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(argv, cwd=REPO, env=cpu_env(), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
    stopped = None
    try:
        deadline = time.monotonic() + 900
        pid = None
        while pid is None or progress_step(run_dir, "mask_learn") < 4:  # a checkpoint exists (step 3)
            assert proc.poll() is None, f"run ended ({proc.returncode}) early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no progress"
            pid = pid or rank_pid(run_dir, "mask_learn", 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGSTOP)
        stopped, at = pid, time.monotonic()
        fired = None
        while proc.poll() is None and time.monotonic() < at + 300:
            if fired is None and "maskprune: watchdog:" in log.read_text():
                fired = time.monotonic() - at
            time.sleep(0.2)
        code = proc.wait(timeout=1)
        took = time.monotonic() - at
        print(f"SIGSTOP of rank 0 after step {progress_step(run_dir, 'mask_learn')}: the watchdog fired "
              f"after {fired} s, the job failed after {took:.0f} s")
        output = log.read_text()
        assert code == 2, output[-3000:]
        # The watchdog fires 60 s after the last progress; then the deepspeed launcher SIGTERMs the
        # ranks and waits LAUNCHER_GRACE_S before it SIGKILLs the stopped one (SIGTERM stays pending).
        assert fired is not None and fired < 60 + 30, f"the watchdog fired after {fired} s"
        assert took < 60 + 60 + LAUNCHER_GRACE_S, f"failed only after {took:.0f} s"
        # Rank 0 is stopped: rank 1, waiting for it in a collective, is the one that reports.
        assert "maskprune: watchdog: rank 1 made no progress for 60 s (launcher.hang_timeout_minutes = 1" \
            in output, output[-3000:]
        dump = output[output.index("maskprune: watchdog:"):]
        assert "Thread 0x" in dump and 'File "' in dump and "stage_mask_learn.py" in dump, dump[:3000]
        assert "maskprune: error: stage mask_learn failed" in output
        assert not wait_until_gone(run_dir, 10), "ranks left running"  # the stopped one too
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for left in run_processes(run_dir):
            left.kill()

    root = run_dir / "mask_learn" / "checkpoints"
    latest = (root / "latest").read_text().strip()
    resumed = run_cli(*argv[1:], timeout=1200).stdout
    assert f"mask_learn: resumed from {root / latest} at step {int(latest.removeprefix('step'))}" in resumed, \
        resumed[-3000:]
    assert "mask_learn step 16/16" in resumed
    assert (run_dir / "mask_learn" / "masks.safetensors").is_file()

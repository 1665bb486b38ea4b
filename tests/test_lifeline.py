"""A stage process exits within a second when any launcher of it is gone (maskprune/lifeline.py):
its direct parent (PR_SET_PDEATHSIG) or one further up (the deepspeed runner above launch.py, the
orchestrator), whose death PDEATHSIG does not report."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, cpu_env

# Stands in for a stage script: "runner" starts "launcher", which starts "rank" (like deepspeed's
# runner -> launch.py -> rank); each names the script in its command line, as the real ones do.
FAKE_STAGE = """
import subprocess, sys, time
from maskprune.lifeline import follow_launchers
role = sys.argv[1]
if role == "rank":
    follow_launchers(sys.argv[0])
    print("ready", flush=True)
    time.sleep(600)
child = {"runner": "launcher", "launcher": "rank"}[role]
subprocess.run([sys.executable, sys.argv[0], child])
time.sleep(600)  # a launcher that outlives its rank must not matter to the test
"""


def start_chain(tmp_path: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    script = tmp_path / "stage_fake.py"
    script.write_text(FAKE_STAGE)
    runner = subprocess.Popen([sys.executable, str(script), "runner"], cwd=REPO, env=cpu_env(),
                              stdout=subprocess.PIPE, text=True)
    assert runner.stdout.readline().strip() == "ready"
    launcher = psutil.Process(runner.pid).children()[0]
    return runner, [psutil.Process(runner.pid), launcher, launcher.children()[0]]


@pytest.mark.parametrize("victim", [0, 1], ids=["grandparent", "parent"])
def test_rank_exits_when_a_launcher_dies(tmp_path: Path, victim: int) -> None:
    runner, chain = start_chain(tmp_path)
    rank = chain[2]
    try:
        chain[victim].send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs([rank], timeout=5)
        assert not alive, "the rank outlived its launcher"
    finally:
        for proc in chain:
            if proc.is_running():
                proc.kill()
        runner.wait()

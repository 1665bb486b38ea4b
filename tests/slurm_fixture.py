"""The `slurm` fixture of the slow Slurm tier (tests/test_slurm_real.py, tests/test_slurm_pipeline.py):
a throwaway single-host Slurm (tests/slurm/start_slurm.sh: munged, slurmctld, two `slurmd -N n1/n2`),
stopped by pid (tests/slurm/stop_slurm.sh) however the tests end. Import it into a test module:
`from slurm_fixture import slurm, job_field  # noqa: F401`."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import REPO

SLURM_DIR = REPO / "tests" / "slurm"
_clusters = itertools.count()  # one cluster per module, each on its own ports


def slurm_missing() -> str | None:
    """Why the tier cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (slurmd runs jobs as their user)"
    if not shutil.which("sbatch") or not Path("/usr/sbin/slurmd").exists() or not Path("/usr/sbin/munged").exists():
        return "Slurm is not installed: apt-get install munge slurmctld slurmd slurm-client"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    # Not under pytest's tmp dir: that is 0700 and munged runs as the munge user.
    state = Path(tempfile.mkdtemp(prefix="maskprune-slurm-"))
    base = 17000 + (os.getpid() % 250) * 16 + (next(_clusters) % 4) * 4
    try:
        proc = subprocess.run([str(SLURM_DIR / "start_slurm.sh"), str(state), str(base)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"start_slurm.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        yield {"SLURM_CONF": str(state / "slurm.conf"), "dir": state}
    finally:
        cancel_all_jobs(state / "slurm.conf")
        subprocess.run([str(SLURM_DIR / "stop_slurm.sh"), str(state)], timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def cancel_all_jobs(conf: Path, wait_s: float = 60) -> None:
    """Job steps (slurmstepd and the ranks) outlive the daemons: end every job of this cluster first."""
    if not conf.exists():
        return
    env = dict(os.environ, SLURM_CONF=str(conf))
    try:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, timeout=30)
        deadline = time.time() + wait_s
        while time.time() < deadline:
            jobs = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True,
                                  timeout=30).stdout.split("\n")
            if not any(j.strip() and not j.strip().endswith("PENDING") for j in jobs):
                return
            time.sleep(1)
    except (OSError, subprocess.SubprocessError):
        pass


def job_field(slurm, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=dict(os.environ, SLURM_CONF=slurm["SLURM_CONF"]),
                         capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith(field + "="):
            return word.split("=", 1)[1]
    return ""


class RequeueStarter:
    """Starts a requeued job a few seconds after it is PENDING again instead of after Slurm's hold
    (BeginTime ~2 min after a requeue). Not at once: slurmd revokes the old run's job credential with
    a 1-second timestamp, and a start in that same second is refused ("Killing non-startable batch
    JobId=N: Job credential revoked") and ends the job FAILED."""

    def __init__(self, slurm, job: str, wait_s: float = 3.0):
        self.env = dict(os.environ, SLURM_CONF=slurm["SLURM_CONF"])
        self.job, self.wait_s = job, wait_s
        self.pending_since: float | None = None
        self.started = 0

    def poll(self, state: str) -> None:
        if state != "PENDING":
            self.pending_since = None
            return
        if self.pending_since is None:
            self.pending_since = time.time()
        elif time.time() - self.pending_since >= self.wait_s:
            subprocess.run(["scontrol", "update", f"JobId={self.job}", "StartTime=now"], env=self.env,
                           capture_output=True, timeout=30)
            self.started += 1
            self.pending_since = None


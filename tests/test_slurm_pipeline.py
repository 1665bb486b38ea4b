"""Slow tier, issue 7: the REAL tiny pipeline as one job of a real single-host Slurm (tests/slurm/
start_slurm.sh: munged, slurmctld, two `slurmd -N n1/n2`). `launch/pipeline.sbatch` runs `maskprune
run` on the batch host; mask_learn and continued_pretrain start through `srun` (launcher.kind = srun),
one deepspeed launcher per node, one CPU rank per node: a world of 2 ranks across the two "nodes";
the export stage runs afterwards as one process on the batch host, and evaluate shares its parts over
both nodes (launcher.evaluate_workers = 2: one srun task per node).
The job is preempted once through the USR1 path (`scancel --batch --signal=USR1`, what `#SBATCH
--signal=B:USR1@300` does before the time limit) during mask_learn: the trap writes RUN/STOP, every
rank stops at the same step boundary with a checkpoint, the driver exits 3, the job requeues itself,
resumes the stopped stage at that step and finishes. Its masks, LoRA adapter and final HF model must
equal bit for bit those of an uninterrupted local run (`launcher.kind = deepspeed`, 2 ranks).

Skipped without root or the Debian packages `munge slurmctld slurmd slurm-client`."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_run
from helpers import REPO, cpu_env, run_cli
from slurm_fixture import RequeueStarter, job_field, slurm, slurm_missing  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(slurm_missing() is not None, reason=f"Slurm tier: {slurm_missing()}")]

SETS = ["--set", "mask_learn.train.steps=12", "--set", "mask_learn.train.checkpoint_every=4",
        "--set", "mask_learn.budget_warmup_fraction=0.33", "--set", "mask_learn.train.eval_every=6",
        "--set", "continued_pretrain.train.steps=8", "--set", "continued_pretrain.train.checkpoint_every=4",
        "--set", "continued_pretrain.train.eval_every=4", "--set", "launcher.evaluate_workers=2"]
PREEMPT_AFTER_STEP = 5
JOB_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def reference(tiny_tokenized: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same pipeline, uninterrupted, on this machine: 2 deepspeed CPU ranks on one node (up to
    the final model: evaluate writes nothing that is compared)."""
    run = copy_run(tiny_tokenized, tmp_path_factory.mktemp("slurm_reference") / "run")
    run_cli("run", "configs/tiny.toml", "--run-dir", str(run), *SETS, "--until", "export",
            "--set", "launcher.kind=deepspeed", "--set", "launcher.num_nodes=1", "--set", "launcher.num_gpus=2",
            timeout=1500)
    return run


def job_env(slurm, hostfile_dir: Path) -> dict[str, str]:
    """What the user's shell would pass to sbatch: the CPU settings of the other tests and this
    cluster's slurm.conf; the batch script picks .venv/bin/maskprune and launcher.*."""
    env = {k: v for k, v in cpu_env().items()
           if not k.startswith(("SLURM_", "SRUN_", "SBATCH_", "MASKPRUNE_BIN", "MASKPRUNE_LAUNCH",
                                "MASKPRUNE_HOME", "MASKPRUNE_MAX_REQUEUES", "MASTER_"))}
    with socket.socket() as sock:  # not 20000 + job id: other sessions on this machine use that too
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # PATH as for the reference run: the batch script finds .venv/bin/maskprune by itself, and a
    # `ninja` other than the one the other tests use would rebuild DeepSpeed's JIT op in the shared
    # TORCH_EXTENSIONS_DIR (each ninja version hashes the build commands differently).
    env.update(SLURM_CONF=slurm["SLURM_CONF"], MASKPRUNE_GPUS_PER_NODE="1", MASKPRUNE_HOSTFILE_DIR=str(hostfile_dir), MASTER_PORT=str(port))
    return env


def mask_learn_step(run: Path) -> int:
    try:
        return int(json.loads((run / "mask_learn" / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def tail(path: Path, chars: int = 8000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def ctld_log(slurm, lines: int = 40) -> str:
    path = Path(slurm["dir"]) / "log" / "slurmctld.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def assert_same_tensors(expected: Path, actual: Path) -> int:
    a, b = load_file(str(expected)), load_file(str(actual))
    assert a.keys() == b.keys(), f"{actual.name}: {sorted(a.keys() ^ b.keys())}"
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{actual}: {name} differs"
    return len(a)


def test_pipeline_job_preempted_by_usr1_requeues_resumes_and_ends_bit_identical(slurm, reference, tiny_tokenized,
                                                                                tmp_path):
    run = copy_run(tiny_tokenized, tmp_path / "run")
    out = run / "job.out"
    env = job_env(slurm, tmp_path)
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={out}", "launch/pipeline.sbatch",
                           "configs/tiny.toml", str(run), *SETS],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    started, preempted_at, state, states = time.time(), None, "", []
    starter = RequeueStarter(slurm, job)
    try:
        deadline = started + JOB_TIMEOUT_S
        while (state := job_field(slurm, job, "JobState")) != "COMPLETED":
            if not states or states[-1][1] != state:
                states.append((round(time.time() - started, 1), state))
            assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), \
                f"job {job} {state} ({states}):\n{tail(out)}\nslurmctld.log:\n{ctld_log(slurm)}"
            assert time.time() < deadline, f"job {job} still {state} after {JOB_TIMEOUT_S} s:\n{tail(out)}"
            if preempted_at is None and state == "RUNNING" and mask_learn_step(run) >= PREEMPT_AFTER_STEP:
                preempted_at = mask_learn_step(run)
                subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=30)
            if preempted_at is not None:
                starter.poll(state)  # the requeued job, without Slurm's ~2 min hold
            time.sleep(0.2)
    finally:
        if state != "COMPLETED":  # nothing of a failed job may outlive the test
            subprocess.run(["scancel", "--full", job], env=env, timeout=30)
    elapsed = time.time() - started
    log = out.read_text(errors="replace")
    assert preempted_at is not None, f"mask_learn was never seen at step >= {PREEMPT_AFTER_STEP}:\n{tail(out)}"

    # The launch: the batch script chose the per-node srun pattern over both nodes, 1 rank each.
    assert "--set launcher.kind=srun --set launcher.num_nodes=2 --set launcher.num_gpus=1" in log
    assert (tmp_path / f"maskprune-hostfile.{job}.0.1").read_text() == "n1 slots=1\nn2 slots=1\n"

    # The preemption: one stop at a step boundary after the signal, one requeue, a resume there.
    stops = [int(s) for s in re.findall(r"mask_learn: stop requested; checkpoint at step (\d+) saved", log)]
    assert len(stops) == 1 and preempted_at <= stops[0] < 12, (preempted_at, stops, tail(out))
    assert "mask_learn: stopped on request" in log
    assert f"requeueing job {job} (restart 1)" in log
    assert job_field(slurm, job, "Restarts") == "1"
    assert "mask_learn: running (resume)" in log
    assert f"mask_learn/checkpoints/step{stops[0]:08d} at step {stops[0]}" in log  # resumed there
    assert "final checkpoint:" in log and not (run / "STOP").exists()
    # evaluate shared its parts over both nodes (one srun task each) and assembled one report.
    assert re.search(r"evaluate: \d+ part\(s\) over 2 workers \(srun, one per node\)", log), tail(out)
    assert "evaluate: worker 1 of 2:" in log and "evaluate: worker 2 of 2:" in log
    assert set(json.loads((run / "evaluate" / "results.json").read_text())["models"]) == {"dense", "pruned",
                                                                                       "pruned+cpt"}
    info = json.loads(run_cli("status", str(run), "--json").stdout)
    assert {stage: s["status"] for stage, s in info["stages"].items()} == dict.fromkeys(info["stages"], "done")
    assert info["stages"]["mask_learn"]["attempts"] == 2

    # The result: bit-identical to the uninterrupted local run.
    checked = assert_same_tensors(reference / "mask_learn" / "masks.safetensors",
                                  run / "mask_learn" / "masks.safetensors")
    checked += assert_same_tensors(reference / "mask_learn" / "lora" / "adapter_model.safetensors",
                                   run / "mask_learn" / "lora" / "adapter_model.safetensors")
    shards = sorted(p.name for p in (reference / "export" / "model").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (run / "export" / "model").glob("*.safetensors"))
    for shard in shards:
        checked += assert_same_tensors(reference / "export" / "model" / shard,
                                       run / "export" / "model" / shard)
    print(f"job {job}: preempted at step {preempted_at}, stopped at step {stops[0]}, finished in "
          f"{elapsed:.0f} s; states {states}; {checked} tensors equal")

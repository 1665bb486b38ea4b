"""Fault injection on the real pipeline (2 CPU ranks, ZeRO-3, fp32): SIGKILL of one rank mid-training,
a checkpoint write cut short, a kill during hard-prune, during the export stage and during
tools/zero_to_hf.py.

What must hold: the launcher tears the job down and `maskprune run` reports the failure; the same
command resumes from the newest *complete* checkpoint and ends bit-identical to an uninterrupted run;
an incomplete checkpoint is never resumed from nor named by `latest`; a half-written output folder is
never taken for a finished one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_run
from helpers import BIN, REPO, cpu_env, run_cli, run_processes, wait_until_gone
from maskprune.rundir import RunDir
from maskprune.safetensors_io import SafetensorsDir

pytestmark = pytest.mark.slow

SETTINGS = ["mask_learn.train.steps=10", "mask_learn.train.checkpoint_every=3",
            "mask_learn.budget_warmup_fraction=0.3", "mask_learn.train.eval_every=5",
            "mask_learn.train.eval_batches=2",
            "continued_pretrain.train.steps=8", "continued_pretrain.train.checkpoint_every=3",
            "continued_pretrain.train.eval_every=4", "continued_pretrain.train.eval_batches=2",
            "continued_pretrain.train.micro_batch_size=2"]
SEED = int(os.environ.get("MASKPRUNE_FAULT_SEED", time.time_ns() % 10_000))


def run_argv(run_dir: Path, until: str) -> list[str]:
    return ["run", "configs/tiny.toml", "--run-dir", str(run_dir), "--until", until,
            *[x for s in SETTINGS for x in ("--set", s)]]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        source = SafetensorsDir(path)
        return {name: source.get(name) for name in source.names()}
    return load_file(str(path))


def assert_identical(expected: Path, got: Path) -> None:
    a, b = tensors(expected), tensors(got)
    assert a.keys() == b.keys(), (expected, got)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{got}: {name}"


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rank_pid(run_dir: Path, stage: str, rank: int) -> int | None:
    """The pid of one rank of `stage` of the run in `run_dir` (RANK in its environment); the stage
    job runs in its own session, so it is found by its command line."""
    for proc in run_processes(run_dir):
        try:
            cmdline = " ".join(proc.cmdline())
            environ = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if f"stage_{stage}.py" in cmdline and environ.get("RANK") == str(rank) and "--local_rank" in cmdline:
            return proc.pid
    return None


def progress_step(run_dir: Path, stage: str) -> int:
    try:
        return json.loads((run_dir / stage / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def start(run_dir: Path, until: str, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen([str(BIN / "maskprune"), *run_argv(run_dir, until)], cwd=REPO, env=cpu_env(),
                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def kill_one_rank(run_dir: Path, stage: str, at_step: int, rank: int, log: Path) -> str:
    """Run up to `stage`, SIGKILL its rank `rank` once it has done `at_step` steps; the launcher must
    tear the job down and `maskprune run` must report the stage as failed. Returns its output."""
    proc = start(run_dir, stage, log)
    deadline = time.monotonic() + 600
    try:
        pid = None
        while pid is None or progress_step(run_dir, stage) < at_step:
            assert proc.poll() is None, f"run ended ({proc.returncode}) before step {at_step}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no progress"
            pid = pid or rank_pid(run_dir, stage, rank)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        code = proc.wait(timeout=180)  # the launcher stops the other rank, `maskprune run` reports
        assert code == 2, log.read_text()[-3000:]
        assert not wait_until_gone(run_dir, 10), "ranks left running after the launcher exited"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert f"maskprune: error: stage {stage} failed" in output, output[-3000:]
    assert RunDir(run_dir).state(stage).status == "failed"
    return output


def check_checkpoints(root: Path) -> str:
    """`latest` names a complete tag, the newest complete one; returns it."""
    complete = sorted(p.name for p in root.glob("step*") if (p / "COMPLETE").is_file())
    assert complete, f"no complete checkpoint in {root}"
    assert (root / "latest").read_text().strip() == complete[-1]
    return complete[-1]


def plant_incomplete(root: Path, latest: str, every: int) -> Path:
    """What a SIGKILL in the middle of the next save leaves: the tag folder with some files, one of
    them cut short, and no COMPLETE marker (`latest` still names the previous tag)."""
    step = int(latest.removeprefix("step")) + every
    tag = root / f"step{step:08d}"
    if not tag.exists():
        shutil.copytree(root / latest, tag)
        (tag / "COMPLETE").unlink()
        victim = max((p for p in tag.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    assert not (tag / "COMPLETE").exists()
    return tag


@pytest.fixture(scope="module")
def uninterrupted(tiny_tokenized: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = copy_run(tiny_tokenized, tmp_path_factory.mktemp("faults") / "uninterrupted")
    run_cli(*run_argv(run_dir, "export"))
    return run_dir


def test_kill_one_mask_learn_rank_then_resume_is_bit_identical(uninterrupted: Path, tiny_tokenized: Path,
                                                                 tmp_path: Path) -> None:
    rng = random.Random(SEED)
    at_step, rank = rng.randint(4, 8), rng.randint(0, 1)
    print(f"MASKPRUNE_FAULT_SEED={SEED}: SIGKILL of mask_learn rank {rank} after step {at_step}")
    run_dir = copy_run(tiny_tokenized, tmp_path / "run")
    kill_one_rank(run_dir, "mask_learn", at_step, rank, tmp_path / "killed.log")
    root = run_dir / "mask_learn" / "checkpoints"
    latest = check_checkpoints(root)
    incomplete = plant_incomplete(root, latest, every=3)

    resumed = run_cli(*run_argv(run_dir, "mask_learn")).stdout
    assert f"resumed from {root / latest} at step {int(latest.removeprefix('step'))}" in resumed, resumed[-3000:]
    check_checkpoints(root)
    if incomplete.exists():  # re-saved whole at that step, or removed by keep_last
        assert (incomplete / "COMPLETE").is_file()
    ml, ml_ref = run_dir / "mask_learn", uninterrupted / "mask_learn"
    assert_identical(ml_ref / "masks.safetensors", ml / "masks.safetensors")
    assert_identical(ml_ref / "lora" / "adapter_model.safetensors", ml / "lora" / "adapter_model.safetensors")


@pytest.fixture()
def after_hard_prune(uninterrupted: Path, tmp_path: Path) -> Path:
    """A copy of the uninterrupted run with everything after hard_prune not yet run."""
    run_dir = copy_run(uninterrupted, tmp_path / "run")
    run = RunDir(run_dir)
    for stage in ("continued_pretrain", "export", "evaluate"):
        run.clear_stage(stage)
    return run_dir


def test_kill_one_continued_pretrain_rank_then_resume_is_bit_identical(uninterrupted: Path, after_hard_prune: Path,
                                                                       tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    at_step, rank = rng.randint(4, 7), rng.randint(0, 1)
    print(f"MASKPRUNE_FAULT_SEED={SEED}: SIGKILL of continued_pretrain rank {rank} after step {at_step}")
    run_dir = after_hard_prune
    kill_one_rank(run_dir, "continued_pretrain", at_step, rank, tmp_path / "killed.log")
    root = run_dir / "continued_pretrain" / "checkpoints"
    latest = check_checkpoints(root)
    plant_incomplete(root, latest, every=3)
    resumed = run_cli(*run_argv(run_dir, "export")).stdout
    assert f"resumed from {root / latest}" in resumed, resumed[-3000:]
    check_checkpoints(root)
    assert_identical(uninterrupted / "export" / "model", run_dir / "export" / "model")


def test_incomplete_checkpoint_is_refused_by_conversion_and_never_latest(uninterrupted: Path,
                                                                         tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted / "continued_pretrain" / "checkpoints", root)
    latest = check_checkpoints(root)
    tag = plant_incomplete(root, latest, every=3)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "zero_to_hf.py"), str(tag), str(tmp_path / "out")],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "incomplete checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    assert (root / "latest").read_text().strip() == latest  # the root still converts from `latest`


class Planted:
    """What a malicious `.pt` holds: unpickling it calls os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_planted_pickle_in_a_checkpoint_runs_nothing_on_resume_or_export(uninterrupted: Path,
                                                                           tmp_path: Path) -> None:
    """DeepSpeed unpickles its checkpoint files with weights_only=False; maskprune forces tensors-only
    (maskprune.safe_load), so a swapped optimizer file is refused by name on resume and on export,
    and the command it carries never runs. The unplanted checkpoints of this run resume and export
    through the same forced loads in every other test here."""
    run_dir = copy_run(uninterrupted, tmp_path / "run")
    root = run_dir / "continued_pretrain" / "checkpoints"
    tag = root / check_checkpoints(root)
    marker = tmp_path / "planted_command_ran"
    torch.save({"optimizer_state_dict": Planted(f"touch {marker}")},
               tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    refusal = "names posix.system, which no DeepSpeed checkpoint holds; it was not loaded"

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "zero_to_hf.py"), str(tag), str(tmp_path / "out")],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"maskprune: error: {tag}: a file in it {refusal}") and "Delete this checkpoint" in line
    assert not (tmp_path / "out").exists() and not marker.exists()

    RunDir(run_dir).mark_failed("continued_pretrain", "preempted")  # as a killed job leaves it
    proc = subprocess.run([str(BIN / "maskprune"), *run_argv(run_dir, "continued_pretrain")], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=600)
    # Rank 1 reads its own optimizer file (ZeRO-3), so rank 1 says it; the launcher ends rank 0.
    assert proc.returncode == 2 and f"maskprune: error (rank 1): {tag}: a file in it {refusal}" in proc.stderr, \
        proc.stderr[-3000:]
    assert not marker.exists()


def kill_when_staging(argv: list[str], staging: Path, log: Path, env: dict[str, str]) -> int:
    """Start `argv`, SIGKILL its whole process group as soon as `staging` (the output's partial
    folder) exists; returns how many tries it took (a run can finish before it is seen)."""
    for attempt in range(1, 4):
        with open(log, "w") as handle:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not staging.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return attempt
        raise AssertionError(f"ended ({proc.returncode}) before writing {staging}:\n{log.read_text()[-3000:]}")
    raise AssertionError("never caught mid-write")


# Many long equivalence sequences keep the stage busy after its weights are written, before publishing.
SLOW_CHECK = ["--set", "hard_prune.equivalence_sequences=64", "--set", "hard_prune.equivalence_seq_len=256"]


def test_kill_during_hard_prune_leaves_no_finished_looking_output(uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = copy_run(uninterrupted, tmp_path / "run")
    for stage in ("hard_prune", "continued_pretrain", "export", "evaluate"):
        RunDir(run_dir).clear_stage(stage)
    argv = [str(BIN / "maskprune"), *run_argv(run_dir, "hard_prune"), *SLOW_CHECK]
    kill_when_staging(argv, run_dir / "hard_prune" / ".model.partial", tmp_path / "killed.log", cpu_env())
    run = RunDir(run_dir)
    assert run.state("hard_prune").status != "done"
    assert not (run_dir / "hard_prune" / "model").exists()
    assert run.final_checkpoint() is None  # nothing is offered as the result
    status = run_cli("status", str(run_dir), "--json")
    assert json.loads(status.stdout)["stages"]["hard_prune"]["status"] == "running"

    run_cli(*run_argv(run_dir, "hard_prune"), *SLOW_CHECK)
    assert run.state("hard_prune").status == "done"
    assert not (run_dir / "hard_prune" / ".model.partial").exists()
    assert_identical(uninterrupted / "hard_prune" / "model", run_dir / "hard_prune" / "model")


def test_kill_during_export_leaves_no_model_and_the_rerun_redoes_only_the_export(uninterrupted: Path,
                                                                                 tmp_path: Path) -> None:
    run_dir = copy_run(uninterrupted, tmp_path / "run")  # continued_pretrain done, its checkpoints kept
    run = RunDir(run_dir)
    for stage in ("export", "evaluate"):
        run.clear_stage(stage)
    checkpoints = Path(run.state("continued_pretrain").outputs["checkpoints"])
    before = digest_tree(checkpoints)
    slow_check = ["--set", "export.equivalence_sequences=64", "--set", "export.equivalence_seq_len=256"]
    argv = [str(BIN / "maskprune"), *run_argv(run_dir, "export"), *slow_check]
    kill_when_staging(argv, run_dir / "export" / ".model.partial", tmp_path / "killed.log", cpu_env())
    assert run.state("export").status == "running"
    assert not (run_dir / "export" / "model").exists()
    # What is offered as the result is still the last finished model, not a half-written export.
    assert run.final_checkpoint() == run.state("hard_prune").outputs["model"]

    out = run_cli(*run_argv(run_dir, "export"), *slow_check).stdout
    assert "continued_pretrain: done, skipped" in out and "export: running (resume)" in out, out[-3000:]
    assert run.state("continued_pretrain").attempts == RunDir(uninterrupted).state("continued_pretrain").attempts
    assert digest_tree(checkpoints) == before  # training was not redone, its checkpoints untouched
    assert run.state("export").status == "done" and run.final_checkpoint() == str(run_dir / "export" / "model")
    assert not (run_dir / "export" / ".model.partial").exists()
    assert_identical(uninterrupted / "export" / "model", run_dir / "export" / "model")


def test_kill_during_conversion_keeps_the_previous_export(uninterrupted: Path, tmp_path: Path) -> None:
    root = uninterrupted / "continued_pretrain" / "checkpoints"
    out = tmp_path / "out"
    tool = [sys.executable, str(REPO / "tools" / "zero_to_hf.py")]
    # A finished export of an earlier tag sits in OUT; converting the latest one over it is killed.
    earlier = sorted(p.name for p in root.glob("step*"))[0]
    subprocess.run([*tool, str(root), str(out), "--tag", earlier], cwd=REPO, env=cpu_env(), check=True,
                   capture_output=True, timeout=300)
    previous = digest_tree(out)
    argv = [*tool, str(root), str(out), "--equivalence-sequences", "64"]
    kill_when_staging(argv, tmp_path / ".out.partial", tmp_path / "killed.log", cpu_env())
    assert digest_tree(out) == previous  # still the earlier, complete export
    subprocess.run(argv, cwd=REPO, env=cpu_env(), check=True, capture_output=True, timeout=300)
    assert not (tmp_path / ".out.partial").exists()
    assert_identical(uninterrupted / "export" / "model", out)

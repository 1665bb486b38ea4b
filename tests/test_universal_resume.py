"""Resume on another number of ranks (maskprune/universal.py): a checkpoint written by 2 ZeRO-3 CPU ranks
continues on 1 and on 4 ranks, in mask_learn and in continued_pretrain.

What must hold: the resumed run converts the checkpoint once into `checkpoints/universal/<tag>` without
touching the original, keeps the global batch by changing grad_accum, trains on the same samples, and its
logged losses (the mean over the global batch) follow the uninterrupted 2-rank run's step by step within
fp tolerance (the gradient sums run in another order); mask_learn ends with the same masks.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_run
from helpers import REPO, cpu_env, run_cli, small_filesystem
from maskprune import universal
from maskprune.config import TrainLoopConfig
from maskprune.rundir import RunDir, disk_bytes
from maskprune.training import CheckpointError
from maskprune.universal import conversion_bytes, grad_accum_for_resume

STAGES = {"mask_learn": 8, "continued_pretrain": 6}  # steps; checkpoints every half
SETTINGS = [f"{stage}.train.{key}={value}" for stage, steps in STAGES.items() for key, value in
            (("steps", steps), ("checkpoint_every", steps // 2), ("keep_last", 4), ("micro_batch_size", 1),
             ("grad_accum", 2), ("warmup_steps", 2), ("eval_every", steps), ("eval_batches", 2))]
SETTINGS.append("mask_learn.budget_warmup_fraction=0.375")
DOWNSTREAM = {"mask_learn": ("hard_prune", "continued_pretrain", "export", "evaluate"),
              "continued_pretrain": ("export", "evaluate")}


def run_argv(run_dir: Path, until: str, ranks: int) -> list[str]:
    return ["run", "configs/tiny.toml", "--run-dir", str(run_dir), "--until", until,
            *[x for s in [*SETTINGS, f"launcher.num_gpus={ranks}"] for x in ("--set", s)]]


def losses(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def digest_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_tokenized: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = copy_run(tiny_tokenized, tmp_path_factory.mktemp("universal") / "uninterrupted")
    run_cli(*run_argv(run_dir, "continued_pretrain", ranks=2))
    return run_dir


def cut_back(uninterrupted: Path, stage: str, dest: Path) -> tuple[Path, str]:
    """A copy of the uninterrupted run as if `stage` had died right after its middle checkpoint."""
    run_dir = copy_run(uninterrupted, dest)
    run = RunDir(run_dir)
    for later in DOWNSTREAM[stage]:
        run.clear_stage(later)
    root = run_dir / stage / "checkpoints"
    middle = f"step{STAGES[stage] // 2:08d}"
    for tag in root.glob("step*"):
        if tag.name > middle:
            shutil.rmtree(tag)
    (root / "latest").write_text(middle)
    run.mark_failed(stage, "node lost")
    return run_dir, middle


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("ranks", [1, 4])
def test_checkpoint_of_two_ranks_resumes_on_another_number(uninterrupted: Path, tmp_path: Path, stage: str,
                                                           ranks: int) -> None:
    run_dir, middle = cut_back(uninterrupted, stage, tmp_path / "run")
    root = run_dir / stage / "checkpoints"
    original = digest_tree(root / middle)

    out = run_cli(*run_argv(run_dir, stage, ranks)).stdout
    assert f"written by 2 ranks, resuming on {ranks}: loading its universal form {root / 'universal' / middle}" \
        in out, out[-3000:]
    accum = 4 // ranks
    assert f"grad_accum 2 -> {accum}, keeping the global batch of 4 sequences" in out, out[-3000:]
    assert f"resumed from {root / middle} at step {STAGES[stage] // 2}" in out, out[-3000:]
    assert digest_tree(root / middle) == original  # converted beside it, never in place
    assert not list((root / "universal").glob(".*partial"))
    assert not list((root / "universal").glob(".*heartbeat"))  # rank 0's, for the waiting ranks: gone after

    # The resumed steps' losses (means over the same global batches) follow the 2-rank run.
    tag = "loss/total" if stage == "mask_learn" else "loss/train"
    expected, got = losses(uninterrupted / "tb" / stage, tag), losses(run_dir / "tb" / stage, tag)
    resumed_steps = list(range(STAGES[stage] // 2 + 1, STAGES[stage] + 1))
    assert sorted(got) == resumed_steps
    for step in resumed_steps:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)
    if stage == "mask_learn":
        ref, new = (load_file(str(r / "mask_learn" / "masks.safetensors")) for r in (uninterrupted, run_dir))
        for name in ("keep.q_heads", "keep.kv_heads", "keep.ffn"):
            assert torch.equal(ref[name], new[name]), name
        lora = [load_file(str(r / "mask_learn" / "lora" / "adapter_model.safetensors"))
                for r in (uninterrupted, run_dir)]
        for name in lora[0]:
            torch.testing.assert_close(lora[1][name], lora[0][name], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_mask_learn_on_another_rank_count_with_the_same_global_batch_reads_the_same_sequences(
        tiny_tokenized: Path, tmp_path: Path) -> None:
    """The calibration read is whole global batches (8 x 6 sequences for 1 x 3 x 2 here), so a fresh
    run on 3 ranks with grad_accum 2 calibrates on the same sequences and trains on the same batches
    as one on 2 ranks (it read 8 x micro x ranks: 16 and 24 sequences, and every loss differed), and a
    2-rank checkpoint resumes on 3 ranks (it sat at 16 + 6k sequences, which 3 ranks refused)."""
    uninterrupted = copy_run(tiny_tokenized, tmp_path / "ranks2")
    run_cli(*run_argv(uninterrupted, "mask_learn", ranks=2), "--set", "mask_learn.train.grad_accum=3")
    fresh = copy_run(tiny_tokenized, tmp_path / "ranks3")
    run_cli(*run_argv(fresh, "mask_learn", ranks=3), "--set", "mask_learn.train.grad_accum=2")
    run_dir, _ = cut_back(uninterrupted, "mask_learn", tmp_path / "resumed")
    out = run_cli(*run_argv(run_dir, "mask_learn", ranks=3), "--set", "mask_learn.train.grad_accum=3").stdout
    assert "grad_accum 3 -> 2, keeping the global batch of 6 sequences" in out, out[-3000:]

    expected = losses(uninterrupted / "tb" / "mask_learn", "loss/total")
    for other, steps in ((fresh, range(1, 9)), (run_dir, range(5, 9))):
        got = losses(other / "tb" / "mask_learn", "loss/total")
        assert sorted(got) == list(steps)
        for step in steps:
            assert got[step] == pytest.approx(expected[step], rel=1e-4), (other.name, step, got, expected)
    ref, new = (load_file(str(r / "mask_learn" / "masks.safetensors")) for r in (uninterrupted, fresh))
    for name in ("keep.q_heads", "keep.kv_heads", "keep.ffn"):
        assert torch.equal(ref[name], new[name]), name


def convert_cli(checkpoints: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maskprune.universal", str(checkpoints), "--workers", "1"],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_conversion_fits_the_room_it_asks_for_and_is_refused_without_it(uninterrupted: Path, tmp_path: Path) -> None:
    """The 2-rank continued_pretrain checkpoint (2.8 MB) on real small filesystems: with the room
    check_room asks for and 1 MiB over, the conversion succeeds (its real peak fits the estimate);
    with 1 MiB under, one line, exit 2, and nothing written beside the checkpoint."""
    source = uninterrupted / "continued_pretrain" / "checkpoints" / f"step{STAGES['continued_pretrain']:08d}"
    need = universal.ROOM_MARGIN * conversion_bytes(source) + universal.FRAGMENT_ALLOWANCE
    for slack, fits in ((1 << 20, True), (-(1 << 20), False)):
        size = int(disk_bytes(source) + need + slack) // 4096 * 4096
        with small_filesystem(tmp_path / f"fs{int(fits)}", f"{size}") as fs:
            checkpoint = fs / "checkpoints" / source.name
            shutil.copytree(source, checkpoint)
            original = digest_tree(checkpoint)
            proc = convert_cli(checkpoint.parent)
            assert digest_tree(checkpoint) == original
            if fits:
                assert proc.returncode == 0, proc.stderr[-3000:]
                assert (fs / "checkpoints" / "universal" / source.name / "COMPLETE").is_file()
                continue
            assert proc.returncode == 2, proc.stderr[-3000:]
            errors = [line for line in proc.stderr.splitlines() if "error" in line]
            assert len(errors) == 1 and errors[0].startswith(f"maskprune.universal: error: {fs / 'checkpoints'}: "), \
                proc.stderr[-3000:]
            assert "resume on the 2 ranks that wrote it (no conversion needed)" in errors[0]
            assert sorted(p.name for p in (fs / "checkpoints").iterdir()) == [source.name]


# ----------------------------------------------------------------------------- fast: the batch arithmetic

def fake_checkpoint(root: Path, world_size: int, train_batch_size: int) -> None:
    tag = root / "step00000004"
    tag.mkdir(parents=True)
    (tag / "maskprune_meta.json").write_text(json.dumps({"world_size": world_size,
                                                         "train_batch_size": train_batch_size}))
    (tag / "COMPLETE").write_text("4\n")


def test_grad_accum_keeps_the_checkpoints_global_batch(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, world_size=16, train_batch_size=64)  # 2 nodes x 8 GPUs, micro 2, accum 2
    train = TrainLoopConfig(micro_batch_size=2, grad_accum=2)
    assert grad_accum_for_resume(tmp_path, train, 16) == 2
    assert grad_accum_for_resume(tmp_path, train, 8) == 4  # a node lost
    assert grad_accum_for_resume(tmp_path, train, 32) == 1  # more nodes
    assert grad_accum_for_resume(tmp_path, TrainLoopConfig(micro_batch_size=2, grad_accum=2, resume="never"),
                                 8) == 2
    assert grad_accum_for_resume(tmp_path / "none", train, 8) == 2  # nothing to resume
    with pytest.raises(CheckpointError, match="global batch of 64 sequences; 24 ranks x micro_batch_size 2 "
                                              "cannot make it up"):
        grad_accum_for_resume(tmp_path, train, 24)
    with pytest.raises(CheckpointError, match="64 is not a multiple of 128"):
        grad_accum_for_resume(tmp_path, train, 64)



def test_a_conversion_without_room_is_refused_before_anything_is_written(tmp_path: Path, disk_of, capsys) -> None:
    """A 64-rank checkpoint of 1 GiB of optimizer states per rank (sparse files) with 100 GiB free:
    the conversion needs 2 x 64 GiB + 1 GiB (x 1.05) and is refused with one line, exit 2."""
    fake_checkpoint(tmp_path, world_size=64, train_batch_size=256)
    tag = tmp_path / "step00000004"
    for r in range(64):
        with open(tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", "wb") as f:
            f.truncate(1 << 30)
    assert conversion_bytes(tag) == 129 << 30
    disk_of(tmp_path, 164 << 30)  # 64 GiB of it the checkpoint's
    assert universal.main([str(tmp_path), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error") == 1 and err.startswith(f"maskprune.universal: error: {tmp_path}: 100.00 GiB free, "
                                                      f"and converting {tag} to its universal form"), err
    assert "resume on the 64 ranks that wrote it" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000004"]  # no universal/ folder

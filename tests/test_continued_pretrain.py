"""Continued pretraining on 2 CPU ranks under ZeRO-3: the loss falls on real text, a SIGKILLed run
resumed with resume = "auto" ends in the very same weights, and its TensorBoard curves do not overlap.
The export stage, one process after the training job has exited, turns the final checkpoint into
the HF model.

The pruned model is a small random-init Llama (built in code, with the prepared model's tokenizer)
recorded as hard_prune's output, so these tests need only the prepare and tokenize stages.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from helpers import BIN, REPO, cpu_env, run_cli, small_filesystem
from maskprune.config import ContinuedPretrainConfig, ConfigError, DistillConfig, load_config
from maskprune.data import TokenShards, eval_batches
from maskprune.dev_texts import dev_windows
from maskprune.dist import DistInfo
from maskprune.evaluation import perplexity
from maskprune.pretrain import TeacherMismatchError, check_teacher_vocab
from maskprune.rundir import RunDir
from maskprune.safetensors_io import SafetensorsDir
from maskprune.training import (COMPLETE_MARKER, DEV_SCORE, META_FILE, Checkpointer, CheckpointSpaceError,
                                tag_for)

STAGE = REPO / "pipeline" / "stage_continued_pretrain.py"
EXPORT = REPO / "pipeline" / "stage_export.py"
STEPS = 12
SETTINGS = [f"continued_pretrain.train.steps={STEPS}", "continued_pretrain.train.micro_batch_size=2",
            "continued_pretrain.train.grad_accum=2", "continued_pretrain.train.warmup_steps=2",
            "continued_pretrain.train.lr=3e-3", "continued_pretrain.train.checkpoint_every=3",
            "continued_pretrain.train.keep_last=2", "continued_pretrain.train.eval_every=6",
            "continued_pretrain.train.eval_batches=2"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_pruned_model(out: Path, prepared: Path) -> None:
    """What hard_prune would hand over: a smaller uniform Llama (2 heads / 1 KV, FFN 96, 2 layers)."""
    source = AutoConfig.from_pretrained(prepared)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=source.vocab_size, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=96,
                         max_position_embeddings=512, bos_token_id=source.bos_token_id,
                         eos_token_id=source.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (prepared / name).is_file():
            shutil.copy2(prepared / name, out / name)


@pytest.fixture(scope="module")
def base_run(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare + tokenize done (real Penn Treebank text), hard_prune recorded as done."""
    run_dir = tmp_path_factory.mktemp("cpt") / "base"
    shutil.copytree(tiny_prepared, run_dir)
    run_cli("run", "configs/tiny.toml", "--run-dir", str(run_dir), "--until", "tokenize")
    run = RunDir(run_dir)
    run.write_config(load_config(REPO / "configs" / "tiny.toml", SETTINGS))
    pruned = run.stage_dir("hard_prune") / "model"
    make_pruned_model(pruned, Path(run.state("prepare").outputs["model"]))
    run.mark_running("hard_prune", run.load_config())
    run.mark_done("hard_prune", {"model": str(pruned)})
    return run_dir


def fresh_run(base: Path, dest: Path, *settings: str) -> Path:
    shutil.copytree(base, dest)
    if settings:
        run = RunDir(dest)
        run.write_config(load_config(REPO / "configs" / "tiny.toml", [*SETTINGS, *settings]))
    return dest


def stage_argv(run_dir: Path) -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(STAGE),
            "--run-dir", str(run_dir)]


def run_stage(run_dir: Path, timeout: float = 900, cwd: Path = REPO) -> str:
    proc = subprocess.run(stage_argv(run_dir), cwd=cwd, env=cpu_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"stage failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def run_export(run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """The export stage as `maskprune run` starts it: plain python, no launcher."""
    return subprocess.run([sys.executable, str(EXPORT), "--run-dir", str(run_dir)], cwd=REPO,
                          env=cpu_env(**env), capture_output=True, text=True, timeout=600)


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb" / "continued_pretrain"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    source = SafetensorsDir(model_dir)
    return {name: source.get(name) for name in source.names()}


@pytest.fixture(scope="module")
def uninterrupted(base_run: Path) -> tuple[Path, str]:
    """The training job, then (once it has exited) the export; returns the training job's output."""
    run_dir = fresh_run(base_run, base_run.parent / "uninterrupted")
    stdout = run_stage(run_dir)
    export = run_export(run_dir)
    assert export.returncode == 0, export.stderr[-5000:]
    return run_dir, stdout


@pytest.mark.slow
def test_loss_falls_and_the_export_is_the_trained_model(uninterrupted: tuple[Path, str]) -> None:
    run_dir, stdout = uninterrupted
    losses = [v for _, v in scalars(run_dir, "loss/train")]
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert "1,024 tokens per step" in stdout  # 2 micro x 128 tokens x 2 ranks x 2 accum
    for tag in ("loss/valid", "loss/valid_ppl", "lr/model", "grad/norm", "throughput/tokens_seen",
                "throughput/tokens_per_s", "memory/rss_gib"):
        assert scalars(run_dir, tag), tag
    state = RunDir(run_dir).state("continued_pretrain")
    assert state.status == "done"
    checkpoints = Path(state.outputs["checkpoints"])
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000009", "step00000012"]
    assert state.outputs["final_tag"] == "step00000012"
    model_dir = Path(RunDir(run_dir).state("export").outputs["model"])
    assert model_dir == run_dir / "export" / "model"
    meta = json.loads((checkpoints / "step00000012" / "maskprune_meta.json").read_text())
    assert meta["stage"] == "continued_pretrain" and meta["lora"] is None and meta["masks"] is None

    # The exported model is the trained one: it reproduces the final validation loss the engine logged.
    # The reference in float64, so the difference is the engine's own fp32 rounding (~1e-6 on a loss of
    # ~5 through 4 layers), not two fp32 summation orders added together.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    valid = TokenShards(RunDir(run_dir).state("tokenize").outputs["data"], "valid")
    with torch.no_grad():
        per_rank = [[model(input_ids=b, labels=b).loss.item() for b in eval_batches(valid, 2, r, 2, 2)]
                    for r in range(2)]
    mean = sum(map(sum, per_rank)) / sum(map(len, per_rank))
    assert abs(mean - scalars(run_dir, "loss/valid")[-1][1]) < 1e-4
    assert (model_dir / "tokenizer.json").is_file()


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_uninterrupted_weights(
        base_run: Path, uninterrupted: tuple[Path, str], tmp_path: Path) -> None:
    """The killed run trains under its own copy of the CPU ds_config; before the resume, which starts
    from another working directory, that file's buckets change (placement, maskprune.ds_json): the
    resume takes them and still ends in the uninterrupted run's weights."""
    own = tmp_path / "ds.json"
    shutil.copy(REPO / "ds_configs" / "zero3_cpu_fp32.json", own)
    run_dir = fresh_run(base_run, base_run.parent / "killed", f"continued_pretrain.ds_config='{own}'")
    progress = run_dir / "continued_pretrain" / "progress.json"
    proc = subprocess.Popen(stage_argv(run_dir), cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    try:
        # Past the first checkpoint (step 3) and well before the end.
        while not (progress.is_file() and json.loads(progress.read_text())["step"] >= 5):
            assert proc.poll() is None, f"stage exited ({proc.returncode}) before step 5"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = json.loads(progress.read_text())["step"]
    assert killed_at < STEPS
    frozen = run_dir / "continued_pretrain" / "ds_config.json"
    assert json.loads(frozen.read_text()) == json.loads(own.read_text())
    ds = json.loads(own.read_text())
    ds["zero_optimization"].update(reduce_bucket_size=250000, stage3_prefetch_bucket_size=0)
    own.write_text(json.dumps(ds))
    stdout = run_stage(run_dir, cwd=tmp_path)
    assert "resumed from" in stdout
    assert ("continued_pretrain: resuming with the ds_config's new placement (zero_optimization.reduce_bucket_size: "
            "500000 -> 250000; zero_optimization.stage3_prefetch_bucket_size: 500000 -> 0)") in stdout
    assert json.loads(frozen.read_text()) == ds
    assert run_export(run_dir).returncode == 0

    expected = weights(Path(RunDir(uninterrupted[0]).state("export").outputs["model"]))
    got = weights(run_dir / "export" / "model")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    # Every step's training loss exactly once, and the same values as the uninterrupted run.
    train = scalars(run_dir, "loss/train")
    assert [s for s, _ in train] == list(range(1, STEPS + 1))
    assert [v for _, v in train] == [v for _, v in scalars(uninterrupted[0], "loss/train")]


@pytest.mark.slow
def test_a_stage_started_by_hand_refuses_to_resume_under_another_precision(base_run: Path, tmp_path: Path) -> None:
    """Without `maskprune run` to refuse first, rank 0 of the stage does, and every rank stops before
    the model is built; the frozen copy is kept."""
    own = tmp_path / "ds.json"
    shutil.copy(REPO / "ds_configs" / "zero3_cpu_fp32.json", own)
    run_dir = fresh_run(base_run, tmp_path / "run", f"continued_pretrain.ds_config='{own}'")
    frozen = run_dir / "continued_pretrain" / "ds_config.json"
    frozen.parent.mkdir()
    frozen.write_text(json.dumps({**json.loads(own.read_text()), "bf16": {"enabled": True}}))
    proc = subprocess.run(stage_argv(run_dir), cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert (f"maskprune: error: ds_config {own} changed since the stage started (bf16.enabled: true -> false); its "
            f"checkpoints were trained under the copy in {frozen}: restore the file, or pass --force") in output
    assert output.count("changed since the stage started") == 1  # rank 1 does not repeat it
    assert "built LlamaForCausalLM" not in output
    assert not (run_dir / "continued_pretrain" / "checkpoints").exists()
    assert json.loads(frozen.read_text())["bf16"] == {"enabled": True}


@pytest.mark.slow
def test_distillation_with_activation_checkpointing(base_run: Path) -> None:
    run_dir = fresh_run(base_run, base_run.parent / "distill", "continued_pretrain.train.steps=4",
                        "continued_pretrain.distill.kl_weight=0.5",
                        "continued_pretrain.activation_checkpointing=true")
    run_stage(run_dir)
    distill = [v for _, v in scalars(run_dir, "loss/distill")]
    ce = [v for _, v in scalars(run_dir, "loss/ce")]
    total = [v for _, v in scalars(run_dir, "loss/train")]
    assert len(distill) == 4 and all(d > 0 for d in distill)
    for c, d, t in zip(ce, distill, total):
        assert abs(c + 0.5 * d - t) < 1e-5
    assert (run_dir / "continued_pretrain" / "checkpoints" / "step00000004" / "COMPLETE").is_file()


@pytest.mark.slow
def test_the_training_job_exports_nothing_and_the_export_runs_after_it(
        uninterrupted: tuple[Path, str]) -> None:
    run_dir, stdout = uninterrupted
    run = RunDir(run_dir)
    cpt, export = run.state("continued_pretrain"), run.state("export")
    # The distributed job ends with its checkpoint: no model folder, no export line in its log.
    assert set(cpt.outputs) == {"checkpoints", "final_tag", "select"} and cpt.outputs["select"] == "last"
    assert not (run_dir / "continued_pretrain" / "model").exists()
    assert "] export: " not in stdout and "prune_report" not in stdout
    # The export started only once the training job had recorded its end (and exited: run_stage
    # waited for the launcher), in its own process, and exported exactly the final tag.
    assert export.status == "done" and export.started_at > cpt.finished_at
    report = json.loads((run_dir / "export" / "model" / "prune_report.json").read_text())
    assert report["origin"]["checkpoint"] == str(Path(cpt.outputs["checkpoints"]) / cpt.outputs["final_tag"])
    assert report["origin"]["stage"] == "continued_pretrain" and report["origin"]["step"] == STEPS
    assert export.outputs["checkpoint"] == report["origin"]["checkpoint"]


def test_export_refuses_to_run_as_many_ranks(tmp_path: Path) -> None:
    # Under deepspeed/torchrun every rank would write the same staging folder: one clear error instead.
    proc = run_export(tmp_path, WORLD_SIZE="2", RANK="0")
    assert proc.returncode == 2 and proc.stderr.count("maskprune: error:") == 1, proc.stderr[-3000:]
    assert "runs as one process" in proc.stderr
    assert not (tmp_path / "export").exists()


def test_shard_size_moved_to_the_export_section() -> None:
    with pytest.raises(ConfigError, match="continued_pretrain.shard_size_mb: moved to export.shard_size_mb"):
        load_config(REPO / "configs" / "tiny.toml", ["continued_pretrain.shard_size_mb=100"])
    assert load_config(REPO / "configs" / "tiny.toml", ["export.shard_size_mb=100"]).export.shard_size_mb == 100


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_losses_and_weights(
        base_run: Path, uninterrupted: tuple[Path, str]) -> None:
    run_dir = fresh_run(base_run, base_run.parent / "checkpointed",
                        "continued_pretrain.activation_checkpointing=true")
    stdout = run_stage(run_dir)
    assert "activation checkpointing: 2 decoder layers recompute their forward in backward" in stdout
    for tag in ("loss/train", "loss/valid", "grad/norm"):
        plain, checkpointed = scalars(uninterrupted[0], tag), scalars(run_dir, tag)
        assert [s for s, _ in checkpointed] == [s for s, _ in plain], tag
        assert [v for _, v in checkpointed] == pytest.approx([v for _, v in plain], rel=1e-5), tag
    assert run_export(run_dir).returncode == 0
    expected = weights(Path(RunDir(uninterrupted[0]).state("export").outputs["model"]))
    got = weights(run_dir / "export" / "model")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_distillation_refuses_a_teacher_with_another_vocabulary() -> None:
    with pytest.raises(TeacherMismatchError, match="vocab_size 32000"):
        check_teacher_vocab(LlamaConfig(vocab_size=1024), LlamaConfig(vocab_size=32000), "dense/")
    check_teacher_vocab(LlamaConfig(vocab_size=1024), LlamaConfig(vocab_size=1024), "dense/")


def test_config_refuses_hidden_state_distillation() -> None:
    with pytest.raises(ConfigError, match="hidden_weight"):
        ContinuedPretrainConfig(distill=DistillConfig(kl_weight=1.0, hidden_weight=0.5)).validate()


# Penn Treebank's validation split as the dev text (the run trains on its train split): 5 windows
# of 128 tokens, an odd count over 2 ranks, so one rank pads its last batch.
DEV = ['continued_pretrain.dev_texts=[{kind = "treebank", split = "valid"}]', "continued_pretrain.dev_tokens=640",
       "continued_pretrain.select=best_dev", "continued_pretrain.train.eval_every=3",
       "continued_pretrain.train.keep_last=1"]


def test_best_dev_exports_the_checkpoint_with_the_lowest_dev_perplexity(base_run: Path, tmp_path: Path) -> None:
    run_dir = fresh_run(base_run, tmp_path / "dev", *DEV)
    stdout = run_stage(run_dir)
    assert "continued_pretrain: dev texts treebank:valid (5 x 128 tokens)" in stdout
    assert "continued_pretrain: no dev window shares a 32-token run with the training text" in stdout
    dev = scalars(run_dir, "loss/dev_ppl_geomean")
    assert [step for step, _ in dev] == [3, 6, 9, 12]
    assert dev == scalars(run_dir, "loss/dev_ppl/treebank_valid")  # one text: its ppl is the geomean
    outputs = RunDir(run_dir).state("continued_pretrain").outputs
    best_step = min(dev, key=lambda point: (point[1], point[0]))[0]
    assert outputs["select"] == "best_dev" and outputs["final_tag"] == tag_for(best_step)
    # keep_last = 1 rotated every other checkpoint out, but not the best one.
    kept = sorted(p.name for p in (run_dir / "continued_pretrain" / "checkpoints").glob("step*"))
    assert kept == sorted({tag_for(best_step), tag_for(STEPS)}) == sorted(outputs["dev_ppl_geomean"])
    assert outputs["dev_ppl_geomean"][tag_for(best_step)] == pytest.approx(dict(dev)[best_step], rel=1e-6)
    # The recorded score is the evaluate stage's perplexity of the exported model on the same windows:
    # the windows dealt over 2 ranks, padded and summed across them, lose nothing and count nothing twice.
    export = run_export(run_dir)
    assert export.returncode == 0, export.stderr[-5000:]
    report = json.loads((run_dir / "export" / "model" / "prune_report.json").read_text())
    assert report["origin"]["step"] == best_step
    run = RunDir(run_dir)
    windows = dev_windows("continued_pretrain", run.load_config().continued_pretrain,
                          run.state("tokenize").outputs["data"], 128,
                          DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))["treebank:valid"]
    assert windows.shape == (5, 128)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model", dtype=torch.float32)
    ppl = perplexity(model, windows.flatten(), 128, batch_size=2)["ppl"]
    assert ppl == pytest.approx(outputs["dev_ppl_geomean"][tag_for(best_step)], rel=1e-4)


def test_rotation_keeps_the_checkpoint_with_the_best_dev_score(tmp_path: Path) -> None:
    for step, score in [(3, 5.0), (6, 4.0), (9, 4.0), (10, None), (12, 4.5)]:
        folder = tmp_path / tag_for(step)
        folder.mkdir()
        (folder / META_FILE).write_text(json.dumps({"step": step} if score is None else {DEV_SCORE: score}))
        (folder / COMPLETE_MARKER).write_text(f"{step}\n")
    (tmp_path / tag_for(15)).mkdir()  # a save killed before its marker: never a candidate
    best = Checkpointer(tmp_path, keep_last=1, keep_best=True)
    assert best.best() == tag_for(6)  # the earliest of equal scores; step 10 (a stop request) has none
    assert best.rotated_out() == [tag_for(3), tag_for(9), tag_for(10)]
    assert Checkpointer(tmp_path, keep_last=2).rotated_out() == [tag_for(3), tag_for(6), tag_for(9)]


MIB = 2**20


def fake_checkpoint(root: Path, step: int, mib: float, complete: bool = True, score: float | None = None) -> None:
    folder = root / tag_for(step)
    folder.mkdir(parents=True)
    (folder / "optim_states.pt").write_bytes(bytes(int(mib * MIB)))
    (folder / META_FILE).write_text(json.dumps({"step": step} if score is None else {DEV_SCORE: score}))
    if complete:
        (folder / COMPLETE_MARKER).write_text(f"{step}\n")


def test_room_for_a_checkpoint_comes_from_what_rotation_removes_anyway(tmp_path: Path, disk_of, capsys) -> None:
    """keep_last 2, checkpoints of 10 MiB on a 25 MiB disk: the save of step 9 finds 5 MiB free; the
    folder of a killed save and then step 3 go first, step 6 (the newest) stays."""
    for step in (3, 6):
        fake_checkpoint(tmp_path, step, 10)
    fake_checkpoint(tmp_path, 8, 2, complete=False)  # a save killed half-way
    disk_of(tmp_path, 25 * MIB)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    assert ckpt._free_room(estimate=1, step=9) is None
    assert sorted(p.name for p in tmp_path.glob("step*")) == [tag_for(6)]
    out = capsys.readouterr().out
    assert f"WARNING: removed {tmp_path / tag_for(8)} before the checkpoint of step 9 rather than after it" in out
    assert f"removed {tmp_path / tag_for(3)}" in out and "a checkpoint takes ~10.5 MiB" in out
    assert ckpt._free_room(estimate=1, step=9) is None  # 15 MiB free now: nothing more goes
    assert sorted(p.name for p in tmp_path.glob("step*")) == [tag_for(6)]


def test_no_room_even_without_rotation_names_the_sizes_and_keeps_the_newest_and_the_best(
        tmp_path: Path, disk_of) -> None:
    for step, score in [(3, 4.0), (6, 5.0), (9, 6.0)]:
        fake_checkpoint(tmp_path, step, 10, score=score)
    disk_of(tmp_path, 38 * MIB)
    problem = Checkpointer(tmp_path, keep_last=3, keep_best=True)._free_room(estimate=1, step=12)
    # Rotation after step 12 would keep 6, 9 and 12, and the best (3): nothing may go early.
    assert sorted(p.name for p in tmp_path.glob("step*")) == [tag_for(3), tag_for(6), tag_for(9)]
    assert problem == (f"{tmp_path}: 8.0 MiB free, and the checkpoint of step 12 needs ~10.5 MiB (the size of "
                       f"{tag_for(9)}); kept: {tag_for(3)}, {tag_for(6)}, {tag_for(9)}. Nothing was written; "
                       "free space there or move the run directory to a larger filesystem, or lower "
                       "train.keep_last (now 3), then rerun (resume = \"auto\" continues from the newest checkpoint)")


def test_before_the_first_checkpoint_the_estimate_is_twelve_bytes_per_trainable_parameter(tmp_path: Path,
                                                                                          disk_of) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    disk_of(root, 30 * MIB)
    ckpt = Checkpointer(root, keep_last=2)
    assert ckpt._free_room(estimate=28 * MIB, step=50) is None  # 1.05 x 28 MiB = 29.4 MiB
    problem = ckpt._free_room(estimate=30 * MIB, step=50)
    assert problem.startswith(f"{root}: 30.0 MiB free, and the checkpoint of step 50 needs ~31.5 MiB "
                              "(12 bytes per trainable parameter); kept: none.")
    assert "keep_last" not in problem  # keep_last 2: lowering it frees nothing
    assert isinstance(CheckpointSpaceError(problem), ValueError)  # a stage reports it in one line, exit 2


@pytest.mark.slow
def test_a_disk_with_room_for_two_checkpoints_gives_the_same_weights(
        base_run: Path, uninterrupted: tuple[Path, str]) -> None:
    """Checkpoints of 2.36 MB, keep_last 2, a 6 MiB filesystem: the third save would not fit beside
    two, so each save from step 9 on removes the oldest first; training and the result are untouched."""
    run_dir = fresh_run(base_run, base_run.parent / "small_disk")
    with small_filesystem(run_dir / "continued_pretrain" / "checkpoints", "6m") as checkpoints:
        stdout = run_stage(run_dir)
        assert sorted(p.name for p in checkpoints.glob("step*")) == [tag_for(9), tag_for(12)]
        for step, removed in [(9, 3), (12, 6)]:
            assert (f"WARNING: removed {checkpoints / tag_for(removed)} before the checkpoint of step {step} "
                    "rather than after it") in stdout
        assert stdout.count("WARNING: removed") == 2
        assert run_export(run_dir).returncode == 0
    expected = weights(Path(RunDir(uninterrupted[0]).state("export").outputs["model"]))
    got = weights(run_dir / "export" / "model")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_a_disk_without_room_for_one_checkpoint_fails_before_the_first_step(base_run: Path) -> None:
    run_dir = fresh_run(base_run, base_run.parent / "full_disk")
    with small_filesystem(run_dir / "continued_pretrain" / "checkpoints", "2m") as checkpoints:
        proc = subprocess.run(stage_argv(run_dir), cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("maskprune: error: ")]
        assert errors == [f"maskprune: error: {checkpoints}: 2.0 MiB free, and the checkpoint of step 3 needs "
                          "~2.3 MiB (12 bytes per trainable parameter); kept: none. Nothing was written; free space "
                          "there or move the run directory to a larger filesystem, then rerun (resume = \"auto\" "
                          "continues from the newest checkpoint)"], proc.stderr[-3000:]
        assert "continued_pretrain step 1/" not in proc.stdout
        assert list(checkpoints.iterdir()) == []


@pytest.mark.parametrize("settings, error", [
    (["continued_pretrain.select=best_dev"], "no continued_pretrain.dev_texts to choose by"),
    ([*DEV[:3], "continued_pretrain.train.eval_every=4", "continued_pretrain.train.checkpoint_every=6"],
     r"checkpoint_every \(6\) is not a multiple of eval_every \(4\)"),
    (['continued_pretrain.dev_texts=[{kind = "treebank", split = "train"}]'],
     "continued_pretrain.dev_texts: treebank 'train' is also in data.sources"),
    (['mask_learn.dev_texts=[{kind = "treebank", split = "valid"}]',
      'evaluate.heldout_texts=[{kind = "treebank", split = "valid"}]'],
     "evaluate.heldout_texts: treebank 'valid' is also in mask_learn.dev_texts, which steer the run"),
])
def test_dev_texts_config_errors(settings: list[str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load_config(REPO / "configs" / "tiny.toml", settings)

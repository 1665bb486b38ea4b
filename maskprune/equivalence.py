"""The built-in equivalence check: pruned checkpoint vs the masked dense model, same inputs.

The masked dense reference is the source model with LoRA merged and hard masks applied exactly
where slicing happens: per-head attention output before o_proj, act(gate)·up before down_proj,
dropped layers as identity, and — for hidden pruning — every RMSNorm normalising over the kept
channels only and emitting zeros elsewhere (what the sliced norm computes; channels outside the
kept set can then never reach a kept output). Weights are rounded through the output dtype first,
so the comparison measures slicing, not dtype rounding. The end-to-end check runs in float64: in
fp32 a sliced matmul sums in another order than the masked one, and through SmolLM2's 30 layers
that alone reached 4e-3 on the logits. The block check compares one layer at a time in fp32 (one
layer's summation-order error is far below the tolerance; fp32 halves its memory).

Small models are compared end to end on logits; above a size limit, a sample of layers is
compared block by block (one decoder layer in memory at a time).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from maskprune.arch import LlamaShape
from maskprune.export import ExportPlan, WeightSource, hf_config, merged_weight, output_dtype
from maskprune.families import FAMILIES, family_of
from maskprune.lora_merge import LoraAdapter
from maskprune.masks_io import KeepIndices
from maskprune.safetensors_io import SafetensorsDir


def _indicator(size: int, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(size)
    mask[kept.long()] = 1.0
    return mask


def _mask_input(mask: torch.Tensor):
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0] * mask.to(args[0].dtype), *args[1:])
    return hook


def _identity(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def mask_layer(layer: torch.nn.Module, index: int, keep: KeepIndices, shape: LlamaShape) -> list[RemovableHandle]:
    """Hooks that make one dense decoder layer compute what its sliced counterpart computes."""
    family = FAMILIES[shape.family]
    heads = _indicator(shape.num_attention_heads, keep.q_heads[index]).repeat_interleave(shape.head_dim)
    handles = [family.attn_module(layer).o_proj.register_forward_pre_hook(_mask_input(heads)),
               family.mlp_module(layer).down_proj.register_forward_pre_hook(
                   _mask_input(_indicator(shape.intermediate_size, keep.ffn[index])))]
    if keep.hidden is not None:  # never for a family with scaled embeddings (export refuses it)
        for norm in family.layer_norms:
            handles.append(getattr(layer, norm).register_forward_hook(
                masked_norm_hook(keep.hidden, shape.hidden_size)))
    if keep.layers is not None and index not in keep.layers.tolist():
        handles.append(layer.register_forward_hook(_identity, with_kwargs=True))
    return handles


def masked_norm_hook(hidden: torch.Tensor, size: int):
    mask = _indicator(size, hidden)

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].float()
        variance = x.index_select(-1, hidden.long()).pow(2).mean(-1, keepdim=True)
        normed = (x * torch.rsqrt(variance + module.variance_epsilon)).to(args[0].dtype)
        return module.weight * normed * mask.to(normed.dtype)
    return hook


def mask_dense_model(model: torch.nn.Module, keep: KeepIndices) -> list[RemovableHandle]:
    """Hard masks on a dense model of any supported family; remove the returned handles to undo."""
    shape = LlamaShape.from_hf_config(model.config)
    handles = [h for index, layer in enumerate(model.model.layers) for h in mask_layer(layer, index, keep, shape)]
    if keep.hidden is not None:
        handles.append(model.model.norm.register_forward_hook(masked_norm_hook(keep.hidden, shape.hidden_size)))
    return handles


def _reference_weight(source: WeightSource, lora: LoraAdapter | None, name: str, dtype: str) -> torch.Tensor:
    return merged_weight(source, lora, name).to(output_dtype(dtype, source, name)).double()


def _eager_config(config: dict[str, Any]):
    cfg = hf_config(config)  # the config's own family (a pruned Llama may be a Mistral)
    cfg._attn_implementation = "eager"  # one attention kernel on both sides of the comparison
    return cfg


def check_full(plan: ExportPlan, src_config: dict[str, Any], source: WeightSource,
               lora: LoraAdapter | None, keep: KeepIndices, dtype: str, out_dir: Path,
               sequences: int, seq_len: int) -> float:
    """Max |logit difference| of the pruned checkpoint (loaded by transformers) vs the masked dense model."""
    from transformers import AutoModelForCausalLM

    # Built in float64 (not cast to it afterwards): buffers computed in the constructor, such as
    # Gemma's embedding scale sqrt(hidden_size), must be the float64 values from_pretrained gives
    # the pruned model, not fp32 ones cast up (sqrt(640) differs by 1.2e-8 relative).
    dense = AutoModelForCausalLM.from_config(_eager_config(src_config), dtype=torch.float64).eval()
    names = plan.source_names & set(source.names())
    if src_config.get("tie_word_embeddings"):
        names.discard("lm_head.weight")
    state = {name: _reference_weight(source, lora, name, dtype) for name in names}
    missing, unexpected = dense.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # tied: lm_head is embed_tokens
        raise RuntimeError(f"reference model does not match the source: {missing} {unexpected}")
    mask_dense_model(dense, keep)
    pruned = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float64,
                                                  attn_implementation="eager").eval()
    ids = torch.randint(0, int(src_config["vocab_size"]), (sequences, seq_len),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((dense(input_ids=ids).logits - pruned(input_ids=ids).logits).abs().max())


def check_blocks(plan: ExportPlan, src_config: dict[str, Any], source: WeightSource,
                 lora: LoraAdapter | None, keep: KeepIndices, dtype: str, out_dir: Path,
                 sequences: int, seq_len: int, layers: int) -> tuple[float, list[int]]:
    """Max |output difference| over a sample of decoder layers, one layer pair in memory at a time."""
    src_shape = LlamaShape.from_hf_config(src_config)
    family = family_of(src_config)
    dense_cfg, pruned_cfg = _eager_config(src_config), _eager_config(plan.config)
    dense_layer, pruned_layer = family.decoder_layer_class(), family_of(plan.config).decoder_layer_class()
    written = SafetensorsDir(out_dir)
    count = len(plan.kept_layers)
    sample = sorted({round(i * (count - 1) / max(layers - 1, 1)) for i in range(min(layers, count))})
    generator = torch.Generator().manual_seed(0)
    hidden = keep.hidden.long() if keep.hidden is not None else torch.arange(src_shape.hidden_size)
    worst = 0.0
    for new in sample:
        old = plan.kept_layers[new]
        with torch.device("meta"):  # no init and no second copy: the loaded weights are assigned
            dense, pruned = dense_layer(dense_cfg, old).eval(), pruned_layer(pruned_cfg, new).eval()
        ours = [s for s in plan.specs if s.name.startswith(f"model.layers.{new}.")]
        dense.load_state_dict({s.source.removeprefix(f"model.layers.{old}."):
                               _reference_weight(source, lora, s.source, dtype).float() for s in ours}, assign=True)
        pruned.load_state_dict({s.name.removeprefix(f"model.layers.{new}."): written.get(s.name).float()
                                for s in ours}, assign=True)
        mask_layer(dense, old, keep, src_shape)
        small = torch.randn(sequences, seq_len, len(hidden), generator=generator)
        full = torch.zeros(sequences, seq_len, src_shape.hidden_size)
        full[..., hidden] = small
        positions = torch.arange(seq_len).unsqueeze(0)
        rope = family.position_embeddings(dense_cfg, full, positions, old)
        with torch.no_grad():
            want = dense(full, position_embeddings=rope)[..., hidden]
            got = pruned(small, position_embeddings=rope)
        worst = max(worst, float((want - got).abs().max()))
        del dense, pruned, want, got  # one layer pair alive at a time
    return worst, [plan.kept_layers[i] for i in sample]

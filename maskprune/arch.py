"""The uniform Llama shape: parameter counts R(s), admissible target dims and GQA index maps.

Everything that decides "which shapes may come out" lives here, so mask-learn, the one-shot
baselines, hard-prune and the planner agree on one definition.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

AttnMode = Literal["query_per_group", "kv_group"]
AttnModeSetting = Literal["auto", "query_per_group", "kv_group"]
# The class a pruned checkpoint is written as. transformers' LlamaConfig rejects a head count that
# does not divide hidden_size even with an explicit head_dim; MistralConfig (Llama's architecture
# with an optional sliding window, read by vLLM, TGI and llama.cpp) accepts any, but has no bias flags.
Architecture = Literal["auto", "llama", "mistral"]
Written = Literal["llama", "mistral"]


class ShapeError(ValueError):
    """A target shape the pinned transformers would reject or the source cannot produce."""


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # Whose head-count rule a pruned shape obeys: "llama" (heads divide hidden) or "mistral" (any).
    lattice: Written = "llama"
    # What the budget counts (target.budget): 0 = parameters; T > 0 = forward FLOPs of one
    # sequence of T tokens (data.seq_len), attention scores included.
    flops_seq_len: int = 0

    @classmethod
    def from_hf_config(cls, config: Any) -> "LlamaShape":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=get("intermediate_size"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
        )

    def replace(self, **changes: int | str) -> "LlamaShape":
        return dataclasses.replace(self, **changes)

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # Parameter counts, continuous in the head / channel counts so R(s) is differentiable.
    def attn_params_per_layer(self, q_heads: float | None = None, kv_heads: float | None = None) -> float:
        q = self.num_attention_heads if q_heads is None else q_heads
        kv = self.num_key_value_heads if kv_heads is None else kv_heads
        d, hd = self.hidden_size, self.head_dim
        weights = 2 * d * q * hd + 2 * d * kv * hd
        bias = (q * hd + 2 * kv * hd + d) if self.attention_bias else 0
        return weights + bias

    def ffn_params_per_layer(self, channels: float | None = None) -> float:
        i = self.intermediate_size if channels is None else channels
        bias = (2 * i + self.hidden_size) if self.mlp_bias else 0
        return 3 * self.hidden_size * i + bias

    # The budgeted resource R: parameters, or forward matmul FLOPs over one flops_seq_len-token
    # sequence (2 per weight per token, plus QK^T and AV: 2 · 2 · q · head_dim per causal query-key
    # pair). Affine in each head / channel count either way, as the minimax step needs.
    def attn_cost_per_layer(self, q_heads: float | None = None, kv_heads: float | None = None) -> float:
        if not self.flops_seq_len:
            return self.attn_params_per_layer(q_heads, kv_heads)
        q = self.num_attention_heads if q_heads is None else q_heads
        kv = self.num_key_value_heads if kv_heads is None else kv_heads
        t, d, hd = self.flops_seq_len, self.hidden_size, self.head_dim
        return 2 * (2 * d * q * hd + 2 * d * kv * hd) * t + 2 * 2 * q * hd * t * (t + 1) / 2

    def ffn_cost_per_layer(self, channels: float | None = None) -> float:
        if not self.flops_seq_len:
            return self.ffn_params_per_layer(channels)
        i = self.intermediate_size if channels is None else channels
        return 2 * 3 * self.hidden_size * i * self.flops_seq_len

    def prunable_cost(self) -> float:
        """R of the whole shape's attention + FFN: what target.sparsity is a fraction of."""
        return self.num_hidden_layers * (self.attn_cost_per_layer() + self.ffn_cost_per_layer())

    def forward_flops(self, seq_len: int) -> float:
        """Matmul FLOPs of one forward pass over `seq_len` tokens, LM head included."""
        counted = self.replace(flops_seq_len=seq_len)
        return counted.prunable_cost() + 2 * self.hidden_size * self.vocab_size * seq_len

    def prunable_params(self) -> int:
        """Attention + FFN weights of every layer (the default budget, target.budget = "params")."""
        per_layer = self.attn_params_per_layer() + self.ffn_params_per_layer()
        return int(per_layer * self.num_hidden_layers)

    def param_count(self) -> int:
        d = self.hidden_size
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        per_layer = self.attn_params_per_layer() + self.ffn_params_per_layer() + 2 * d
        return int(embed + head + d + per_layer * self.num_hidden_layers)

    def hf_overrides(self) -> dict[str, int]:
        return {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
        }


# ----------------------------------------------------------------------------- attention units

def attn_unit_count(shape: LlamaShape, mode: AttnMode) -> int:
    """Mask entries per layer: one per query head, or one per KV group."""
    if mode not in ("query_per_group", "kv_group"):  # "auto" reaching here would count KV groups silently
        raise ShapeError(f"attn_mode {mode!r}: resolve it against the source shape first (targets.resolve_target)")
    return shape.num_attention_heads if mode == "query_per_group" else shape.num_key_value_heads


def units_to_q_heads(units: float, shape: LlamaShape, mode: AttnMode) -> float:
    """Query heads per layer for `units` kept units (continuous, for R(s))."""
    return units if mode == "query_per_group" else units * shape.group_size


def kv_heads_for_units(units: float, shape: LlamaShape, mode: AttnMode) -> float:
    return shape.num_key_value_heads if mode == "query_per_group" else units


def attn_cost_for_units(units: float, shape: LlamaShape, mode: AttnMode) -> float:
    return shape.attn_cost_per_layer(units_to_q_heads(units, shape, mode), kv_heads_for_units(units, shape, mode))


def head_mask_from_units(unit_mask: torch.Tensor, shape: LlamaShape, mode: AttnMode) -> torch.Tensor:
    """Per-query-head mask (last dim n_q) from per-unit mask; HF repeat_kv maps q head h to KV h // g."""
    if mode == "query_per_group":
        return unit_mask
    return unit_mask.repeat_interleave(shape.group_size, dim=-1)


def legal_attn_units(shape: LlamaShape, mode: AttnMode) -> list[int]:
    """Unit counts whose query-head count the loader of `shape.lattice` accepts (Llama: hidden %
    heads == 0; Mistral: any). In query_per_group mode every group keeps the same number of heads,
    so units are multiples of the KV count."""
    legal = []
    for units in range(1, attn_unit_count(shape, mode) + 1):
        if mode == "query_per_group" and units % shape.num_key_value_heads:
            continue
        q = int(units_to_q_heads(units, shape, mode))
        if shape.lattice == "mistral" or shape.hidden_size % q == 0:
            legal.append(units)
    return legal


def resolve_attn_mode(shape: LlamaShape, requested: AttnModeSetting) -> AttnMode:
    """`auto`: kv_group on an MHA model (one query head per KV head), query_per_group otherwise."""
    if requested == "auto":
        return "kv_group" if shape.group_size == 1 else "query_per_group"
    if requested == "query_per_group" and shape.group_size == 1:
        raise ShapeError(f"target.attn_mode = 'query_per_group' cannot prune heads of this model: it has "
                         f"one query head per KV head ({shape.num_attention_heads} of each), so every group "
                         "keeps its only head; set target.attn_mode = 'kv_group' (or 'auto')")
    return requested


def lattice_for(shape: LlamaShape, architecture: Architecture, biased: bool) -> Written:
    """The head-count rule the planner, mask_learn and baselines must respect for `architecture`.
    Biases (the source's, or FLAP's o_proj/down_proj compensation) need Llama's bias flags, which
    Mistral lacks: then only Llama's lattice can be written."""
    if architecture == "llama" or biased or shape.attention_bias or shape.mlp_bias:
        return "llama"
    return "mistral"


def written_architecture(shape: LlamaShape, architecture: Architecture) -> Written:
    """The class a pruned `shape` is written as: `auto` keeps Llama where its loader accepts the
    shape and writes Mistral otherwise; refused in one line where the choice cannot load it."""
    llama_ok = shape.hidden_size % shape.num_attention_heads == 0
    biased = shape.attention_bias or shape.mlp_bias
    if architecture == "llama" or (architecture == "auto" and (llama_ok or biased)):
        if not llama_ok:
            raise ShapeError(
                f"num_attention_heads={shape.num_attention_heads} does not divide hidden_size="
                f"{shape.hidden_size}, which transformers' LlamaConfig rejects; "
                + ("the model has biases, which MistralConfig has no field for: choose a head count "
                   "that divides hidden_size" if biased else
                   "set hard_prune.architecture = 'auto' or 'mistral' to write it as MistralForCausalLM"))
        return "llama"
    if biased:
        raise ShapeError("hard_prune.architecture = 'mistral': this model has biases (attention_bias / "
                         "mlp_bias, or FLAP's compensation), which MistralConfig has no field for; "
                         "set hard_prune.architecture = 'auto' or 'llama'")
    return "mistral"


def ffn_widths(shape: LlamaShape, alignment: int) -> list[int]:
    step = min(alignment, shape.intermediate_size)
    widths = list(range(step, shape.intermediate_size + 1, step))
    if widths[-1] != shape.intermediate_size:
        widths.append(shape.intermediate_size)
    return widths


def shape_for(shape: LlamaShape, attn_units: int, ffn_width: int, mode: AttnMode) -> LlamaShape:
    return shape.replace(num_attention_heads=int(units_to_q_heads(attn_units, shape, mode)),
                         num_key_value_heads=int(kv_heads_for_units(attn_units, shape, mode)),
                         intermediate_size=ffn_width)


def budget_for_sparsity(shape: LlamaShape, sparsity: float) -> float:
    return (1.0 - sparsity) * shape.prunable_cost()


def admissible(shape: LlamaShape, s_attn: float, s_ffn: float, budget: float, mode: AttnMode,
               alignment: int) -> tuple[int, int]:
    """The legal (attention units, FFN width) nearest to the learned targets s with R <= budget:
    the end-of-stage shape every layer is cut to. Distances are fractions of each type's dense size;
    budget left unused costs the same, so rounding one type down frees room for the other."""
    units = legal_attn_units(shape, mode)
    widths = ffn_widths(shape, alignment)
    layers = shape.num_hidden_layers
    dense = shape.prunable_cost()
    best: tuple[float, int, int] | None = None
    for u in units:
        attn = attn_cost_for_units(u, shape, mode)
        for w in widths:
            r = layers * (attn + shape.ffn_cost_per_layer(w))
            if r > budget:
                continue
            cost = abs(u - s_attn) / units[-1] + abs(w - s_ffn) / widths[-1] + (budget - r) / dense
            if best is None or cost < best[0]:
                best = (cost, u, w)
    if best is None:
        raise ShapeError(f"no legal shape fits the budget of {budget:.0f} "
                         f"{'FLOPs' if shape.flops_seq_len else 'parameters'}: the smallest "
                         f"({units[0]} attention units, {widths[0]} FFN channels) is larger; "
                         "lower target.sparsity or target.ffn_alignment")
    return best[1], best[2]


def check_loadable(shape: LlamaShape, written: Written = "llama") -> None:
    """Refuse shapes the pinned transformers would reject as `written`, naming the legal values."""
    from transformers import LlamaConfig, MistralConfig

    legal_heads = [h for h in range(1, shape.hidden_size + 1) if shape.hidden_size % h == 0
                   and h % max(shape.num_key_value_heads, 1) == 0 and h <= 4 * shape.hidden_size]
    if shape.num_key_value_heads < 1 or shape.num_attention_heads % shape.num_key_value_heads:
        raise ShapeError(f"num_attention_heads={shape.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads={shape.num_key_value_heads}")
    if written == "llama" and shape.hidden_size % shape.num_attention_heads:
        raise ShapeError(f"num_attention_heads={shape.num_attention_heads} does not divide "
                         f"hidden_size={shape.hidden_size}, which transformers rejects; legal head "
                         f"counts with {shape.num_key_value_heads} KV heads: "
                         f"{[h for h in legal_heads if h <= 1024][:32]}")
    try:
        (LlamaConfig if written == "llama" else MistralConfig)(**shape.hf_overrides(), vocab_size=shape.vocab_size)
    except Exception as err:  # the loader's own rule, whatever it is in this version
        raise ShapeError(f"transformers rejects this shape: {err}") from None


def human_count(value: float) -> str:
    """Human-readable parameter count: 134.5M, 6.7B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{1 if value / scale < 100 else 0}f}{unit}"
    return str(int(value))


"""The uniform Llama shape: parameter counts R(s), admissible target dims and GQA index maps.

Everything that decides "which shapes may come out" lives here, so mask-learn, the one-shot
baselines, hard-prune and the planner agree on one definition.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from maskprune.families import ATTN_PROJ, MLP_PROJ, FAMILIES, Architecture, FamilyError, HeadRule, family_of

AttnMode = Literal["query_per_group", "kv_group"]
AttnModeSetting = Literal["auto", "query_per_group", "kv_group"]


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
    # The source family (maskprune.families) and the projections that carry a bias.
    family: str = "llama"
    biases: frozenset[str] = frozenset()
    # Norm weight vectors per layer: over the hidden size, and over head_dim (q_norm / k_norm).
    layer_norms: int = 2
    head_norms: int = 0
    # The head counts a pruned shape may have: those dividing hidden_size, or any (see lattice_for).
    lattice: HeadRule = "divides_hidden"
    # What the budget counts (target.budget): 0 = parameters; T > 0 = forward FLOPs of one
    # sequence of T tokens (data.seq_len), attention scores included.
    flops_seq_len: int = 0

    @classmethod
    def from_hf_config(cls, config: Any) -> "LlamaShape":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        family = family_of(config)
        heads = get("num_attention_heads")
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            head_dim=family.head_dim(config),
            intermediate_size=get("intermediate_size"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            family=family.name,
            biases=family.biased(config),
            layer_norms=len(family.layer_norms),
            head_norms=len(family.head_norms),
        )

    def replace(self, **changes: Any) -> "LlamaShape":
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
        widths = {"q_proj": q * hd, "k_proj": kv * hd, "v_proj": kv * hd, "o_proj": d}
        return weights + sum(widths[p] for p in ATTN_PROJ if p in self.biases)

    def ffn_params_per_layer(self, channels: float | None = None) -> float:
        i = self.intermediate_size if channels is None else channels
        widths = {"gate_proj": i, "up_proj": i, "down_proj": self.hidden_size}
        return 3 * self.hidden_size * i + sum(widths[p] for p in MLP_PROJ if p in self.biases)

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
        norms = self.layer_norms * d + self.head_norms * self.head_dim
        per_layer = self.attn_params_per_layer() + self.ffn_params_per_layer() + norms
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
    """Unit counts whose query-head count `shape.lattice` allows (heads dividing hidden_size, or
    any). In query_per_group mode every group keeps the same number of heads, so units are
    multiples of the KV count."""
    legal = []
    for units in range(1, attn_unit_count(shape, mode) + 1):
        if mode == "query_per_group" and units % shape.num_key_value_heads:
            continue
        q = int(units_to_q_heads(units, shape, mode))
        if shape.lattice == "any" or shape.hidden_size % q == 0:
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


def lattice_for(shape: LlamaShape, architecture: Architecture, biased: bool) -> HeadRule:
    """The head-count rule the planner, mask_learn and baselines must respect when the pruned model
    is written as `architecture` (the source family decides: families/*.py). `biased`: FLAP's
    o_proj / down_proj compensation will be written too."""
    try:
        return FAMILIES[shape.family].lattice(architecture, shape.biases, biased)
    except FamilyError as err:
        raise ShapeError(str(err)) from None


def written_architecture(shape: LlamaShape, architecture: Architecture) -> str:
    """The family (name) a pruned `shape` is written as, refused in one line where the choice
    cannot load it (e.g. a head count LlamaConfig rejects with hard_prune.architecture = 'llama')."""
    try:
        return FAMILIES[shape.family].written(architecture, shape.biases, shape.num_attention_heads,
                                              shape.hidden_size).name
    except FamilyError as err:
        raise ShapeError(str(err)) from None


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


def check_loadable(shape: LlamaShape, written: str = "llama") -> None:
    """Refuse shapes the pinned transformers would reject as family `written`, naming the legal values."""
    import transformers

    family = FAMILIES[written]
    if shape.num_key_value_heads < 1 or shape.num_attention_heads % shape.num_key_value_heads:
        raise ShapeError(f"num_attention_heads={shape.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads={shape.num_key_value_heads}")
    if family.head_rule == "divides_hidden" and shape.hidden_size % shape.num_attention_heads:
        legal_heads = [h for h in range(1, min(shape.hidden_size, 1024) + 1) if shape.hidden_size % h == 0
                       and h % shape.num_key_value_heads == 0]
        raise ShapeError(f"num_attention_heads={shape.num_attention_heads} does not divide "
                         f"hidden_size={shape.hidden_size}, which transformers' {family.config_class} "
                         f"rejects; legal head counts with {shape.num_key_value_heads} KV heads: "
                         f"{legal_heads[:32]}")
    try:
        getattr(transformers, family.config_class)(**shape.hf_overrides(), vocab_size=shape.vocab_size)
    except Exception as err:  # the loader's own rule, whatever it is in this version
        raise ShapeError(f"transformers rejects this shape: {err}") from None


def human_count(value: float) -> str:
    """Human-readable parameter count: 134.5M, 6.7B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{1 if value / scale < 100 else 0}f}{unit}"
    return str(int(value))


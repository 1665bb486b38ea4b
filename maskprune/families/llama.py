"""Llama (LlamaForCausalLM): the reference layout. transformers' LlamaConfig rejects a head count
that does not divide hidden_size even with an explicit head_dim, so hard_prune.architecture picks
how a pruned Llama is written: `auto` keeps Llama where its config accepts the shape and writes
MistralForCausalLM (the same computation with the sliding window off, any head count, but no bias
fields) otherwise; `llama` / `mistral` force one. Biases (the source's, or FLAP's o_proj/down_proj
compensation) need Llama's bias flags."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maskprune.families.base import ATTN_PROJ, MLP_PROJ, Architecture, Family, FamilyError, HeadRule
from maskprune.families.mistral import MISTRAL


@dataclass(frozen=True)
class LlamaFamily(Family):
    def lattice(self, architecture: Architecture, biases: frozenset[str], compensated: bool) -> HeadRule:
        if architecture == "llama" or biases or compensated:
            return "divides_hidden"
        return "any"

    def written(self, architecture: Architecture, biases: frozenset[str], heads: int, hidden: int) -> Family:
        heads_divide, biased = hidden % heads == 0, bool(biases)
        if architecture == "llama" or (architecture == "auto" and (heads_divide or biased)):
            if not heads_divide:
                raise FamilyError(
                    f"num_attention_heads={heads} does not divide hidden_size={hidden}, which transformers' "
                    "LlamaConfig rejects; "
                    + ("the model has biases, which MistralConfig has no field for: choose a head count "
                       "that divides hidden_size" if biased else
                       "set hard_prune.architecture = 'auto' or 'mistral' to write it as MistralForCausalLM"))
            return self
        if biased:
            raise FamilyError("hard_prune.architecture = 'mistral': this model has biases (attention_bias / "
                              "mlp_bias, or FLAP's compensation), which MistralConfig has no field for; "
                              "set hard_prune.architecture = 'auto' or 'llama'")
        return MISTRAL


LLAMA = LlamaFamily(
    name="llama", model_type="llama", architecture="LlamaForCausalLM", prefix="Llama",
    modeling="transformers.models.llama.modeling_llama", config_class="LlamaConfig",
    head_rule="divides_hidden",
    bias_flags={"attention_bias": ATTN_PROJ, "mlp_bias": MLP_PROJ},
)


def compensation_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Llama config with the bias flags FLAP's compensation needs (zero q/k/v/gate/up biases come
    along with the o_proj / down_proj ones it writes)."""
    return {**config, "attention_bias": True, "mlp_bias": True}

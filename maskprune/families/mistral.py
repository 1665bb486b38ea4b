"""Mistral (MistralForCausalLM): Llama's layout without bias fields, with an explicit head_dim (any
head count loads) and an optional sliding window, which a pruned Mistral keeps unchanged. Also the
class a pruned Llama is written as when LlamaConfig rejects its head count (window off)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maskprune.families.base import Family

# LlamaConfig fields MistralConfig does not have (a Mistral output never has biases).
LLAMA_ONLY_FIELDS = ("attention_bias", "mlp_bias", "pretraining_tp")


@dataclass(frozen=True)
class MistralFamily(Family):
    def output_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """Also a bias-free Llama config as Mistral's: the same fields (rope parameters incl.
        Llama-3 scaling, rms_norm_eps, head_dim, tie_word_embeddings), sliding window off unless
        the source had one."""
        mistral = {k: v for k, v in config.items() if k not in LLAMA_ONLY_FIELDS}
        return {**super().output_config(mistral), "sliding_window": config.get("sliding_window")}


MISTRAL = MistralFamily(
    name="mistral", model_type="mistral", architecture="MistralForCausalLM", prefix="Mistral",
    modeling="transformers.models.mistral.modeling_mistral", config_class="MistralConfig",
    head_rule="any",
    # A window shorter than the test sequences, so the tiny model really attends locally.
    tiny_extras={"sliding_window": 32},
)

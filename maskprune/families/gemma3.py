"""Gemma-3 text (Gemma3ForCausalLM, model_type gemma3_text): head_dim decoupled from hidden_size,
per-head q_norm / k_norm over head_dim (shared by all heads: kept whole), four norms per layer
(input, post-attention, pre- and post-feedforward), GeGLU (gelu_pytorch_tanh) MLP, embeddings
scaled by sqrt(hidden_size), interleaved sliding / global layers (layer_types, sliding_window,
per-type rope parameters: carried unchanged; a dropped layer drops its layer_types entry), attention
scaled by query_pre_attn_scalar (not by head count). Gemma's RMSNorm multiplies by (1 + weight).
Gemma3TextConfig rejects a head count that does not divide hidden_size (transformers 5), so only
those are chosen. Hidden-channel pruning is refused: the embedding scale follows hidden_size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from maskprune.families.base import ATTN_PROJ, Family


@dataclass(frozen=True)
class Gemma3Family(Family):
    def position_embeddings(self, config: Any, x: torch.Tensor, positions: torch.Tensor,
                            layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # One rotary table per layer type (global and local layers have their own rope_theta).
        rotary = getattr(self._modeling(), "Gemma3RotaryEmbedding")(config)
        return rotary(x, positions, config.layer_types[layer_index])


GEMMA3 = Gemma3Family(
    name="gemma3", model_type="gemma3_text", architecture="Gemma3ForCausalLM", prefix="Gemma3",
    modeling="transformers.models.gemma3.modeling_gemma3", config_class="Gemma3TextConfig",
    head_rule="divides_hidden",
    layer_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    head_norms=("q_norm", "k_norm"),
    bias_flags={"attention_bias": ATTN_PROJ},
    scaled_embedding=True,
    bos_first=True,  # PTB ppl@128 of Gemma-3-270M: 1175 without BOS, 176 with it
    # Both layer kinds in a tiny model: a short window (below the test sequences) and a global
    # layer every second one; head_dim decoupled from hidden / heads (32 for 64 / 4), and
    # query_pre_attn_scalar = head_dim as in the released models.
    tiny_extras={"sliding_window": 16, "sliding_window_pattern": 2, "head_dim": 32, "query_pre_attn_scalar": 32},
)

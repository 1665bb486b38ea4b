"""Qwen3 (Qwen3ForCausalLM): Llama's layout with an explicit head_dim (any head count loads) and
per-head RMSNorms `q_norm` / `k_norm` over head_dim, applied to every head alike: one weight vector
of head_dim shared by all heads, so it is kept whole whatever heads are cut. attention_bias adds
q/k/v/o biases."""
from __future__ import annotations

from maskprune.families.base import ATTN_PROJ, Family

QWEN3 = Family(
    name="qwen3", model_type="qwen3", architecture="Qwen3ForCausalLM", prefix="Qwen3",
    modeling="transformers.models.qwen3.modeling_qwen3", config_class="Qwen3Config",
    head_rule="any",
    head_norms=("q_norm", "k_norm"),
    bias_flags={"attention_bias": ATTN_PROJ},
    tiny_extras={"head_dim": 32},  # decoupled from hidden / heads, as in the released models
)

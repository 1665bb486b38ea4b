"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): Llama's layout with biases on q, k and v (always; no o_proj
or MLP bias), sliced with their heads. Qwen2's attention reads an explicit head_dim from the config,
so any head count loads (the written config always carries head_dim). Sliding-window fields
(use_sliding_window, sliding_window, max_window_layers, layer_types) are carried unchanged."""
from __future__ import annotations

from maskprune.families.base import Family

QWEN2 = Family(
    name="qwen2", model_type="qwen2", architecture="Qwen2ForCausalLM", prefix="Qwen2",
    modeling="transformers.models.qwen2.modeling_qwen2", config_class="Qwen2Config",
    head_rule="any",
    fixed_biases=("q_proj", "k_proj", "v_proj"),
)

"""benchmarks/common.py: the random models the step benchmarks time must be the shapes the product
writes (bench_gpu's continued-pretrain phase failed on its first GPU run: at --sparsity 0.3 the
1.1B shape keeps 24 of 32 heads, which LlamaConfig rejects for hidden 2048)."""
from __future__ import annotations

import sys

import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from common import llama_config, save_random_llama  # noqa: E402


def test_a_head_count_llama_rejects_is_written_as_the_mistral_hard_prune_writes(tmp_path):
    config = llama_config(512, 64, 2, 3, 1, 96, head_dim=16)
    assert type(config).__name__ == "MistralConfig"
    assert (config.head_dim, config.sliding_window, config.num_attention_heads) == (16, None, 3)
    save_random_llama(tmp_path / "pruned", config)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert type(model).__name__ == "MistralForCausalLM"
    assert model.model.layers[0].self_attn.q_proj.weight.shape == torch.Size([48, 64])
    assert model.model.layers[0].self_attn.k_proj.weight.shape == torch.Size([16, 64])


@pytest.mark.parametrize("head_dim", [None, 16])
def test_a_head_count_that_divides_hidden_stays_a_llama(head_dim):
    config = llama_config(512, 64, 2, 4, 2, 128, head_dim=head_dim)
    assert type(config).__name__ == "LlamaConfig"
    assert config.head_dim == 16

"""Activation checkpointing with the mask hooks, the STE, LoRA and the self-teacher, in one process:
every layer really recomputes in backward (its hooks run a third time), and the losses and every
gradient (mask scores, LoRA) equal those without checkpointing, in float64. The self-teacher run
alongside the student (maskprune/teacher.py) gives exactly what a separate teacher pass gives."""
from __future__ import annotations

from contextlib import AbstractContextManager

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from maskprune.arch import LlamaShape
from maskprune.config import LoraConfig
from maskprune.losses import distill_kl
from maskprune.lora import attach_lora
from maskprune.masking import MaskState, attach_masks
from maskprune.teacher import ShadowTeacher, switched_off
from maskprune.training import prepare_for_training

CONFIG = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)


def mask_learn_micro_step(checkpointing: bool, teacher_alongside: bool = True
                          ) -> tuple[dict[str, float], dict[str, torch.Tensor], list[int]]:
    """One mask-learn micro-step as MaskLearner.forward_losses does it: student (hard masks through
    the STE, LoRA on) with the teacher (masks and LoRA off, no grad) computed alongside, CE + KL,
    backward. `teacher_alongside=False`: the teacher as a pass of its own, first."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).double().eval()  # eval: as from_pretrained returns it
    model.requires_grad_(False)
    shape = LlamaShape.from_hf_config(model.config)
    generator = torch.Generator().manual_seed(1)
    # Some scores negative: those units are masked off in forward yet get a gradient (STE).
    masks = MaskState(shape, "query_per_group",
                      torch.randn(3, 4, generator=generator), torch.randn(3, 48, generator=generator))
    attach_masks(model, masks)
    switch, lora = attach_lora(model, LoraConfig(rank=4, dropout=0.1), seed=0)
    for param in lora:
        param.data = param.data.double()
        param.data.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=torch.float64))
        param.requires_grad_(True)
    calls = [0] * 3
    for index, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    prepare_for_training(model, checkpointing)

    batch = torch.randint(0, 128, (2, 16), generator=generator)
    torch.manual_seed(2)  # LoRA dropout: recomputation must replay the same dropout masks

    def teacher_mode() -> AbstractContextManager[None]:
        return switched_off(masks, switch)

    if teacher_alongside:
        with ShadowTeacher(model, teacher_mode).attach().collect() as teacher:
            out = model(input_ids=batch, labels=batch)
    else:
        with teacher_mode(), torch.no_grad():
            teacher = model(input_ids=batch)
        out = model(input_ids=batch, labels=batch)
    kl = distill_kl(out.logits, teacher.logits, 2.0)
    (out.loss + kl).backward()
    grads = {"mask.attn": masks.attn_scores.grad, "mask.ffn": masks.ffn_scores.grad,
             **{f"lora.{i}": p.grad for i, p in enumerate(lora)}}
    return {"ce": out.loss.item(), "kl": kl.item()}, grads, calls


def test_checkpointing_recomputes_every_layer_once_and_changes_no_number() -> None:
    losses, grads, calls = mask_learn_micro_step(checkpointing=False)
    ckpt_losses, ckpt_grads, ckpt_calls = mask_learn_micro_step(checkpointing=True)
    assert calls == [2, 2, 2]        # teacher + student
    assert ckpt_calls == [3, 3, 3]   # + one recomputation per layer in backward
    assert ckpt_losses == pytest.approx(losses, rel=1e-12)
    assert grads.keys() == ckpt_grads.keys()
    assert grads["mask.attn"].abs().sum() > 0 and grads["mask.ffn"].abs().sum() > 0
    # (A layer whose heads are all masked off passes no gradient to its q/k/v adapters.)
    assert sum(bool(grad.abs().sum() > 0) for grad in grads.values()) > len(grads) // 2
    for name, grad in grads.items():
        # A hook that accumulated state would double it here; the STE's gradient reaches the scores once.
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-6, atol=0), name


def test_training_mode_is_set_with_or_without_checkpointing() -> None:
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    prepare_for_training(model, activation_checkpointing=False)
    assert model.training and model.config.use_cache is False
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    prepare_for_training(model, activation_checkpointing=True)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_teacher_alongside_equals_a_separate_teacher_pass(checkpointing: bool) -> None:
    losses, grads, calls = mask_learn_micro_step(checkpointing, teacher_alongside=True)
    separate_losses, separate_grads, separate_calls = mask_learn_micro_step(checkpointing, teacher_alongside=False)
    # The same modules on the same inputs in the same order of random draws: equal to the bit.
    assert losses == separate_losses and calls == separate_calls
    for name, grad in grads.items():
        assert torch.equal(grad, separate_grads[name]), name


def test_teacher_switches_come_back_on_when_the_teacher_pass_raises() -> None:
    """A teacher pass that raises (out of memory, a stop request) must not leave the student running
    without its masks or adapters for the rest of the job."""
    class Switch:
        enabled = True

    masks, lora = Switch(), Switch()
    with pytest.raises(RuntimeError, match="teacher failed"), switched_off(masks, lora):
        assert not masks.enabled and not lora.enabled
        raise RuntimeError("teacher failed")
    assert masks.enabled and lora.enabled

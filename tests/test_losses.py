"""The shared training losses equal the reference definitions they replace."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from maskprune.losses import distill_kl, lm_losses


def _logits_and_labels(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 11, 37, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 11, 37, generator=generator, dtype=torch.float64)
    return student, teacher, torch.randint(0, 37, (3, 11), generator=generator)


def test_cross_entropy_is_hf_causal_lm_loss() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2)).double().eval()
    batch = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=batch, labels=batch)
        # HF computes its loss in fp32 whatever the logits' dtype; so does this one here.
        ce, kl = lm_losses(out.logits.float(), batch, None, 1.0)
    assert kl is None
    # The same per-token log-probabilities, averaged in another order (HF's mean also walks the
    # ignored last positions): apart by at most n·eps of fp32 relative to the loss, n = 16 tokens.
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    assert abs(ce.item() - out.loss.item()) <= tokens * torch.finfo(torch.float32).eps * out.loss.item()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_shared_log_softmax_gives_the_same_kl(temperature: float) -> None:
    student, teacher, labels = _logits_and_labels(3)
    _, kl = lm_losses(student, labels, teacher, temperature)
    assert kl is not None
    assert torch.equal(kl.double(), distill_kl(student, teacher, temperature).double())


def test_gradients_of_the_shared_pass_equal_two_separate_passes() -> None:
    student, teacher, labels = _logits_and_labels(5)
    shared = student.clone().requires_grad_(True)
    ce, kl = lm_losses(shared, labels, teacher, 1.0)
    (ce + 0.5 * kl).backward()
    separate = student.clone().requires_grad_(True)
    reference_ce = torch.nn.functional.cross_entropy(separate[:, :-1].reshape(-1, 37), labels[:, 1:].reshape(-1))
    (reference_ce + 0.5 * distill_kl(separate, teacher, 1.0)).backward()
    torch.testing.assert_close(shared.grad, separate.grad, rtol=0, atol=1e-14)


def _whole_batch_reference(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
                           temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The unchunked definitions: HF's shifted CE, and T²·KL summed over V, averaged over tokens."""
    vocab = student.shape[-1]
    ce = torch.nn.functional.cross_entropy(student[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    soft = torch.log_softmax(student / temperature, dim=-1)
    target = torch.log_softmax(teacher / temperature, dim=-1)
    kl = (target.exp() * (target - soft)).sum(-1).mean() * temperature ** 2
    return ce, kl


@pytest.mark.parametrize("chunk_tokens", [1, 7, 11, 33, 1024])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_losses_and_gradients_equal_the_whole_batch(monkeypatch, chunk_tokens: int,
                                                            temperature: float) -> None:
    """Chunks that split sequences (7 of 3 x 11 tokens), end on them (11), one per token, and
    one chunk for everything: the same losses and logits gradients as one pass over the batch."""
    import maskprune.losses as losses

    monkeypatch.setattr(losses, "LOSS_CHUNK_TOKENS", chunk_tokens)
    student, teacher, labels = _logits_and_labels(7)
    chunked = student.clone().requires_grad_(True)
    ce, kl = lm_losses(chunked, labels, teacher, temperature)
    (ce + 0.3 * kl).backward()
    whole = student.clone().requires_grad_(True)
    reference_ce, reference_kl = _whole_batch_reference(whole, labels, teacher, temperature)
    (reference_ce + 0.3 * reference_kl).backward()
    torch.testing.assert_close(ce, reference_ce, rtol=0, atol=1e-13)
    torch.testing.assert_close(kl, reference_kl, rtol=0, atol=1e-13)
    torch.testing.assert_close(chunked.grad, whole.grad, rtol=0, atol=1e-14)
    without_grad = lm_losses(student, labels, teacher, temperature)  # evaluation: no checkpointing
    torch.testing.assert_close(torch.stack(without_grad), torch.stack([ce, kl]).detach(), rtol=0, atol=0)

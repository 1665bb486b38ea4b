"""Training losses shared by mask-learn and continued-pretrain.

The logits are a step's largest tensors (B·T·V: 2 GB in fp32 for one 4,096-token sequence at
Llama-3's vocabulary), and a whole-batch log-softmax in fp32 with its gradient held 3 (CE) to 7.5
(CE + KL at a temperature other than 1) such copies at once. The losses are therefore computed over
chunks of LOSS_CHUNK_TOKENS tokens, each recomputed in backward (`torch.utils.checkpoint`): what
stays is the bf16 logits, their gradient and one chunk's fp32 work (`maskprune.planner` counts it;
`tests/test_planner.py` measures it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_CHUNK_TOKENS = 1024
IGNORE = -100  # nll_loss's ignore_index: the last position of a sequence has no next token


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits to fp32 for the softmax; fp64 stays fp64 (the tests compare in it)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _chunk_sums(student: torch.Tensor, targets: torch.Tensor | None, teacher: torch.Tensor | None,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE over the chunk's predicting positions and summed KL(teacher ‖ student) over its
    tokens; at temperature 1 one log-softmax of the student serves both."""
    zero = student.new_zeros((), dtype=torch.float64 if student.dtype == torch.float64 else torch.float32)
    log_probs = F.log_softmax(_upcast(student), dim=-1) if targets is not None or temperature == 1 else None
    ce = F.nll_loss(log_probs, targets, ignore_index=IGNORE, reduction="sum") if targets is not None else zero
    if teacher is None:
        return ce, zero
    t = temperature
    soft = log_probs if t == 1 else F.log_softmax(_upcast(student) / t, dim=-1)
    teacher_log_probs = F.log_softmax(_upcast(teacher) / t, dim=-1)
    return ce, (teacher_log_probs.exp() * (teacher_log_probs - soft)).sum()


def _chunked(student_logits: torch.Tensor, labels: torch.Tensor | None, teacher_logits: torch.Tensor | None,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE, summed KL) over every token of [B, T, V] logits, LOSS_CHUNK_TOKENS at a time."""
    vocab = student_logits.shape[-1]
    students = student_logits.reshape(-1, vocab).split(LOSS_CHUNK_TOKENS)
    count = len(students)
    if labels is None:
        targets: tuple[torch.Tensor | None, ...] = (None,) * count
    else:
        shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)
        targets = shifted.reshape(-1).split(LOSS_CHUNK_TOKENS)
    teachers = (teacher_logits.reshape(-1, vocab).split(LOSS_CHUNK_TOKENS) if teacher_logits is not None
                else (None,) * count)
    ce, kl = zip(*(checkpoint(_chunk_sums, s, y, t, temperature, use_reentrant=False,
                              preserve_rng_state=False)
                   if torch.is_grad_enabled() and s.requires_grad else _chunk_sums(s, y, t, temperature)
                   for s, y, t in zip(students, targets, teachers)))
    return torch.stack(ce).sum(), torch.stack(kl).sum()


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) on temperature-softened logits, summed over the vocabulary and
    averaged over tokens (the T² keeps gradient size independent of T, as in Hinton et al.)."""
    _, kl = _chunked(student_logits, None, teacher_logits, temperature)
    return kl / student_logits.shape[:-1].numel() * temperature * temperature


def lm_losses(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token cross-entropy (HF's causal-LM loss: position i predicts label i+1, mean over
    tokens) and, given a teacher, `distill_kl`, from one chunked pass over the logits."""
    ce_sum, kl_sum = _chunked(student_logits, labels, teacher_logits, temperature)
    batch, seq = labels.shape
    ce = ce_sum / (batch * (seq - 1))
    if teacher_logits is None:
        return ce, None
    return ce, kl_sum / (batch * seq) * temperature * temperature


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the final (normed) hidden states, normalised by the teacher's mean square."""
    s, t = student_hidden.float(), teacher_hidden.float()
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-8)

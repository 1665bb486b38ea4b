"""Training losses shared by mask-learn and continued-pretrain."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits to fp32 for the softmax; fp64 stays fp64 (the tests compare in it)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _kl_to_teacher(student_log_probs: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    teacher = F.log_softmax(_upcast(teacher_logits) / t, dim=-1)
    return (teacher.exp() * (teacher - student_log_probs)).sum(-1).mean() * t * t


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) on temperature-softened logits, summed over the vocabulary and
    averaged over tokens (the T² keeps gradient size independent of T, as in Hinton et al.)."""
    return _kl_to_teacher(F.log_softmax(_upcast(student_logits) / temperature, dim=-1), teacher_logits, temperature)


def lm_losses(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token cross-entropy (HF's causal-LM loss: position i predicts label i+1, mean over
    tokens) and, given a teacher, `distill_kl`. At temperature 1 one log-softmax of the student's
    logits serves both: the logits are a step's largest tensors (B·T·V floats, 2 GB for one
    4,096-token sequence at Llama-3's vocabulary), so a second pass over them is neither free in
    time nor in memory."""
    log_probs = F.log_softmax(_upcast(student_logits), dim=-1)
    ce = F.nll_loss(log_probs[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    if teacher_logits is None:
        return ce, None
    student = log_probs if temperature == 1 else F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    return ce, _kl_to_teacher(student, teacher_logits, temperature)


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the final (normed) hidden states, normalised by the teacher's mean square."""
    s, t = student_hidden.float(), teacher_hidden.float()
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-8)

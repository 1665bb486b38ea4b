"""Training losses shared by mask-learn and continued-pretrain."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) on temperature-softened logits, summed over the vocabulary and
    averaged over tokens (the T² keeps gradient size independent of T, as in Hinton et al.)."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean() * t * t


def hidden_mse(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean squared error of the final hidden states, normalised by the teacher's mean square."""
    s, t = student_hidden[-1].float(), teacher_hidden[-1].float()
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-8)

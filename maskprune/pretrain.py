"""The continued-pretrain loop: full-parameter training of the pruned model under ZeRO-3.

Per optimizer step, `grad_accum` micro-batches: forward (plus a no-grad pass of the dense teacher when
distilling), `engine.backward`, `engine.step` (DeepSpeed applies the update, clipping and schedule at
the accumulation boundary). Checkpoints carry the data position, so `resume = "auto"` continues the
same sample stream; the Checkpointer restores per-rank RNG.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskprune.config import ContinuedPretrainConfig, TrainLoopConfig
from maskprune.dist import log
from maskprune.losses import lm_losses
from maskprune.training import TrainingLoop, build_zero3_model, mean_over_ranks, tag_for


class TeacherMismatchError(ValueError):
    pass


def check_teacher_vocab(student_config: Any, teacher_config: Any, teacher_dir: str) -> None:
    """KL over logits compares token by token: both models must share one vocabulary."""
    if student_config.vocab_size != teacher_config.vocab_size:
        raise TeacherMismatchError(
            f"continued_pretrain.distill: teacher {teacher_dir} has vocab_size {teacher_config.vocab_size}, "
            f"the pruned model {student_config.vocab_size}; logit distillation needs the same "
            "tokenizer — set continued_pretrain.distill.kl_weight = 0")


def build_teacher(teacher_dir: str, student_config: Any, ds: dict[str, Any]) -> tuple[Any, Any]:
    """The dense model partitioned by ZeRO-3 like the student, wrapped in an engine without an
    optimizer (as TRL does for its reference model). Returns (engine, HfDeepSpeedConfig to keep alive)."""
    import deepspeed
    from transformers import AutoConfig

    check_teacher_vocab(student_config, AutoConfig.from_pretrained(teacher_dir), teacher_dir)
    teacher_ds = copy.deepcopy(ds)
    teacher_ds.pop("optimizer", None)
    teacher_ds.pop("scheduler", None)
    model, hf_ds = build_zero3_model(teacher_dir, teacher_ds)
    model.config.use_cache = False
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=teacher_ds)
    engine.eval()
    return engine, hf_ds


@dataclass
class Pretrainer(TrainingLoop):
    cfg: ContinuedPretrainConfig
    teacher: Any | None

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * self.valid.seq_len * self.dist.world_size * t.grad_accum

    def micro_losses(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = batch.to(self.dist.device)
        out = self.engine(input_ids=batch)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=batch).logits
        ce, kl = lm_losses(out.logits, batch, teacher_logits, self.cfg.distill.temperature)
        losses = {"ce": ce}
        total = self.cfg.distill.ce_weight * ce
        if kl is not None:
            losses["distill"] = kl
            total = total + self.cfg.distill.kl_weight * kl
        losses["total"] = total
        return losses

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        accum = self.cfg.train.grad_accum
        lr = self.engine.get_lr()[0]  # the rate this step's update uses (the scheduler steps after it)
        sums: dict[str, torch.Tensor] = {}
        for _ in range(accum):
            losses = self.micro_losses(next(self.train_iter))
            self.engine.backward(losses["total"])
            self.engine.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().double() / accum
        # The logged loss is the mean over every rank's micro-batches, not rank 0's alone.
        stats = {("loss/train" if n == "total" else f"loss/{n}"): v
                 for n, v in mean_over_ranks(sums, self.dist.device).items()}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            stats["grad/norm"] = float(grad_norm)
        stats["lr/model"] = lr
        stats["throughput/tokens_per_s"] = self.tokens_per_step / (time.perf_counter() - started)
        stats["throughput/tokens_seen"] = (self.step + 1) * self.tokens_per_step  # after this step
        return stats

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        self.checkpointer.save(self.engine, self.step, self.train_iter, meta=self.checkpoint_meta())

    def restore(self) -> None:
        resumed = self.checkpointer.resume(self.engine, self.train_iter, self.cfg.train.resume,
                                           "continued_pretrain")
        if resumed is not None:
            self.step = resumed[0]
        train = self.cfg.train
        log(f"continued_pretrain: {self.tokens_per_step:,} tokens per step ({train.micro_batch_size} micro "
            f"x {self.valid.seq_len} tokens x {self.dist.world_size} ranks x {train.grad_accum} accum), "
            f"at step {self.step} of {train.steps}"
            + (f", distilling with kl_weight {self.cfg.distill.kl_weight}" if self.teacher else ""))

    def final_checkpoint(self) -> Path:
        """The checkpoint export makes the model from: the last, or with select = "best_dev" the one
        with the lowest dev score (the last step is always scored, so there is one)."""
        if self.cfg.select == "best_dev":
            return self.checkpointer.root / self.checkpointer.best()
        return self.checkpointer.root / tag_for(self.cfg.train.steps)

    # ------------------------------------------------------------------ loop hooks
    stage = "continued_pretrain"

    @property
    def train_cfg(self) -> TrainLoopConfig:
        return self.cfg.train

    def log_line(self, stats: dict[str, float]) -> str:
        return (f"loss {stats['loss/train']:.4f} lr {stats['lr/model']:.2e} "
                f"grad_norm {stats.get('grad/norm', float('nan')):.3f} "
                f"{stats['throughput/tokens_per_s']:.0f} tok/s")

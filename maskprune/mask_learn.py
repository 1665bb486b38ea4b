"""The mask-learn loop: LoRA through the DeepSpeed engine, masks / targets / duals by the minimax.

Per optimizer step: the student pass with hard masks (STE), which also computes the dense
self-teacher (masks and LoRA off, no grad) layer by layer on the same gathered parameters
(maskprune/teacher.py), CE + distillation backward, the engine's LoRA step, an all-reduce of the
(replicated) mask gradients, then `minimax_step`. The last `hardening_fraction`
of steps train LoRA under the final uniform masks (METHOD_NOTES 4), with `bias_compensation`
replacing removed channels by their running means (maskprune/compensation.py), or `reconstruction`
refitting the kept columns by least squares first (maskprune/reconstruction.py).
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskprune.arch import LlamaShape, admissible, attn_unit_count, shape_for
from maskprune.compensation import RemovedChannelMeans, compensation_bias
from maskprune.config import ConfigError, ExperimentConfig, TrainLoopConfig
from maskprune.data import BatchIterator, TokenShards
from maskprune.dist import DistInfo, log
from maskprune.lora import LoraSwitch, attach_lora
from maskprune.lora_merge import lora_scale
from maskprune.losses import hidden_mse, lm_losses
from maskprune.masking import MaskState, attach_masks, fixed_masks_from_keep, masked_linears
from maskprune.masks_io import KeepIndices, keep_from_scores
from maskprune.minimax import BudgetModel, MinimaxState, StepSizes, minimax_step
from maskprune.reconstruction import MANIFEST, attach_corrections, load_corrections, reconstruct
from maskprune.rundir import atomic_write_json
from maskprune.targets import explicit_units, resolve_target
from maskprune.teacher import ShadowTeacher, switched_off
from maskprune.training import (Checkpointer, TrainingLoop, init_engine, mean_over_ranks,
                                prepare_for_training)


@dataclass
class MaskLearner(TrainingLoop):
    cfg: ExperimentConfig
    masks: MaskState
    lora: LoraSwitch
    minimax: MinimaxState
    budget: BudgetModel
    explicit_units: tuple[int, int] | None = None  # target.arch given: the shape is not learned
    teacher: ShadowTeacher | None = None  # with distillation: the dense model, run alongside
    # With reconstruction: where hardening writes the corrections, and the batches it fits them on.
    reconstruction_dir: Path | None = None
    calibration: list[torch.Tensor] | None = None

    @property
    def ml(self):
        return self.cfg.mask_learn

    @property
    def hardening_start(self) -> int:
        steps = self.ml.train.steps
        return steps - int(round(self.ml.hardening_fraction * steps))

    # ------------------------------------------------------------------ shape decisions
    def target_units(self) -> tuple[int, int]:
        """Exactly admissible(round(s)) per type, with R(k) <= the final budget."""
        if self.explicit_units is not None:
            return self.explicit_units
        shape, target = self.masks.shape, self.cfg.target
        return admissible(shape, self.minimax.s["attn"], self.minimax.s["ffn"],
                          self.budget.final_budget, target.attn_mode, target.ffn_alignment)

    def current_keep(self) -> KeepIndices:
        attn_units, ffn_width = self.target_units()
        keep = keep_from_scores(*self.masks.ranking_scores(), self.masks.shape, attn_units, ffn_width,
                                self.cfg.target.attn_mode, method="maskprune")
        keep.scores = {"attn": self.masks.attn_scores.detach().cpu(), "ffn": self.masks.ffn_scores.detach().cpu()}
        return keep

    def harden(self) -> None:
        keep = self.current_keep()
        attn, ffn = fixed_masks_from_keep(keep.q_heads, keep.ffn, self.masks.shape, self.masks.mode)
        self.masks.fixed_attn, self.masks.fixed_ffn = attn.to(self.dist.device), ffn.to(self.dist.device)
        self.start_compensation()
        log(f"mask_learn: hardening from step {self.step}: every layer keeps "
            f"{keep.q_heads.shape[1]} query heads / {keep.kv_heads.shape[1]} KV heads, "
            f"{keep.ffn.shape[1]} FFN channels; only LoRA trains from here")
        self.start_reconstruction(resumed=False)

    def start_reconstruction(self, resumed: bool) -> None:
        """Fill the corrections for the hardening masks: from the folder a run before wrote (on a
        resume), else by the least-squares pass (LoRA off: Δ depends on the frozen weights only)."""
        folder = self.reconstruction_dir
        if folder is None:
            return
        model = self.engine.module
        if resumed and (folder / MANIFEST).is_file():
            load_corrections(model, self.masks, folder)
            log(f"mask_learn: reconstruction loaded from {folder}")
            return
        with switched_off(self.lora):
            errors = reconstruct(model, self.masks, self.calibration or [], self.ml.reconstruction_damping,
                                 folder, self.dist.is_rank0)
        means = {f"reconstruction/error_{which}/{kind}": sum(e[which] for e in rows) / len(rows)
                 for kind, rows in errors.items() if rows for which in ("cut", "corrected")}
        if self.writer is not None:
            self.writer.scalars(means, self.step)
        log("mask_learn: reconstruction, mean relative output error of the cut layers: " + ", ".join(
            f"{kind} {means[f'reconstruction/error_cut/{kind}']:.4f} -> {means[f'reconstruction/error_corrected/{kind}']:.4f}"
            for kind, rows in errors.items() if rows))

    def start_compensation(self) -> None:
        if self.ml.bias_compensation:
            shape = self.masks.shape
            self.masks.compensation = RemovedChannelMeans(
                shape.num_hidden_layers, {"attn": shape.num_attention_heads * shape.head_dim,
                                          "ffn": shape.intermediate_size}, self.dist.device)

    def compensation_bias(self) -> dict[str, torch.Tensor]:
        """The hardening masks' o_proj / down_proj biases; every rank must call it (it gathers)."""
        return compensation_bias(masked_linears(self.engine.module, self.masks.shape),
                                 self.masks.removed_channels(), self.masks.compensation,
                                 lora_scale(self.ml.lora.rank, self.ml.lora.alpha))

    # ------------------------------------------------------------------ one step
    def teacher_mode(self) -> AbstractContextManager[None]:
        """Masks and LoRA off: the model computes the dense teacher."""
        return switched_off(self.masks, self.lora)

    def forward_losses(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        distill = self.ml.distill
        batch = batch.to(self.dist.device)
        if self.teacher is None:
            ce, _ = lm_losses(self.engine(input_ids=batch).logits, batch, None, distill.temperature)
            return {"ce": ce, "total": distill.ce_weight * ce}
        with self.teacher.collect() as teacher:
            out = self.engine(input_ids=batch)
        ce, kl = lm_losses(out.logits, batch, teacher.logits if distill.kl_weight > 0 else None,
                           distill.temperature)
        losses = {"ce": ce}
        total = distill.ce_weight * ce
        if kl is not None:
            losses["distill"] = kl
            total = total + distill.kl_weight * kl
        if distill.hidden_weight > 0:
            losses["hidden"] = hidden_mse(teacher.student_normed, teacher.normed)
            total = total + distill.hidden_weight * losses["hidden"]
        losses["total"] = total
        return losses

    def mask_grads(self) -> dict[str, torch.Tensor]:
        grads = {}
        for kind, param in (("attn", self.masks.attn_scores), ("ffn", self.masks.ffn_scores)):
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(grad)
                grad /= self.dist.world_size
            grads[kind] = grad.clone()
            param.grad = None
        return grads

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        for _ in range(self.ml.train.grad_accum):
            losses = self.forward_losses(next(self.train_iter))
            self.engine.backward(losses["total"])
            self.engine.step()
            if self.masks.compensation is not None:
                self.masks.compensation.end_micro_batch()
            # Detached device tensors, read once per step below: no host sync per micro-batch.
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().double() / self.ml.train.grad_accum
        sums = mean_over_ranks(sums, self.dist.device)  # the global batch's, not rank 0's alone
        if self.masks.compensation is not None:
            self.masks.compensation.end_step()
        grads = self.mask_grads()
        stats = {f"loss/{k}": v for k, v in sums.items()}
        if self.step < self.hardening_start:
            lr = StepSizes(self.ml.mask_lr_alpha, self.ml.dual_lr_layer, self.ml.dual_lr_budget,
                           self.ml.target_lr, self.ml.rho, self.ml.rho_layer, self.ml.grad_scale_beta,
                           self.ml.mask_grad_clip)
            stats.update(minimax_step({"attn": self.masks.attn_scores.data, "ffn": self.masks.ffn_scores.data},
                                      grads, self.minimax, self.budget, self.step, lr))
            stats["loss/lagrangian"] = self.lagrangian(sums["total"])
        tokens = self.ml.train.grad_accum * self.ml.train.micro_batch_size * \
            self.valid.seq_len * self.dist.world_size
        stats["throughput/tokens_per_s"] = tokens / (time.perf_counter() - started)
        stats["lr/lora"] = self.engine.get_lr()[0]
        return stats

    def lagrangian(self, loss: float) -> float:
        attn_kept, ffn_kept = self.masks.kept_counts()
        value = loss
        for kind, kept in (("attn", attn_kept), ("ffn", ffn_kept)):
            units = self.budget.units[kind]
            value += (self.minimax.y[kind] * (kept.double() - self.minimax.s[kind]) / units).mean().item()
        value += self.minimax.z * (self.budget.cost(self.minimax.s) - self.budget.budget(self.step)) / self.budget.dense
        return value

    # ------------------------------------------------------------------ validation, logging
    def log_layers(self) -> None:
        attn_kept, ffn_kept = self.masks.kept_counts()
        if self.masks.fixed_attn is not None:
            attn_kept, ffn_kept = self.masks.fixed_attn.sum(1).cpu(), self.masks.fixed_ffn.sum(1).cpu()
        units = attn_unit_count(self.masks.shape, self.masks.mode)
        image = torch.stack([attn_kept.float() / units,
                             ffn_kept.float() / self.masks.shape.intermediate_size], dim=1)
        # One row per layer, two columns (attention, FFN), brightness = fraction kept.
        pixels = (image.clamp(0, 1) * 255).to(torch.uint8).repeat_interleave(8, 0).repeat_interleave(16, 1)
        self.writer.image("kept_units/per_layer", pixels.unsqueeze(-1).repeat(1, 1, 3).numpy(), self.step)
        self.writer.histogram("kept_units/attn", attn_kept.float(), self.step)
        self.writer.histogram("kept_units/ffn", ffn_kept.float(), self.step)
        self.writer.histogram("mask_scores/attn", self.masks.attn_scores.detach().cpu(), self.step)
        self.writer.histogram("mask_scores/ffn", self.masks.ffn_scores.detach().cpu(), self.step)

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"mask.attn": self.masks.attn_scores.detach(), "mask.ffn": self.masks.ffn_scores.detach(),
                   **self.minimax.tensors()}
        if self.masks.fixed_attn is not None:
            tensors["fixed.attn"], tensors["fixed.ffn"] = self.masks.fixed_attn, self.masks.fixed_ffn
        if self.masks.compensation is not None:
            tensors.update(self.masks.compensation.tensors())
        if self.masks.corrected:
            tensors["reconstruction.damping"] = torch.tensor(self.ml.reconstruction_damping, dtype=torch.float64)
        return tensors

    def save(self) -> None:
        from maskprune.masks_io import save_keep_indices

        keep = self.current_keep() if self.masks.fixed_attn is None else self.final_keep()
        meta = {**self.checkpoint_meta(), "masks": "maskprune_masks.safetensors"}
        if self.masks.corrected:
            meta["reconstruction"] = self.reconstruction_dir
        # The masks file is part of the checkpoint (zero_to_hf reads it): written before COMPLETE, or
        # a rank killed right after the save (srun --kill-on-bad-exit once another rank has exited
        # on a stop request) leaves a "complete" checkpoint without it.
        self.checkpointer.save(self.engine, self.step, self.train_iter,
                               meta=meta,
                               tensors=self.state_tensors(), exclude_frozen=True,
                               rank0_extra=lambda folder: save_keep_indices(
                                   folder / "maskprune_masks.safetensors", keep))

    def restore(self) -> None:
        resumed = self.checkpointer.resume(self.engine, self.train_iter, self.ml.train.resume, "mask_learn")
        if resumed is None:
            return
        self.step, tensors = resumed
        self.masks.attn_scores.data.copy_(tensors["mask.attn"])
        self.masks.ffn_scores.data.copy_(tensors["mask.ffn"])
        self.minimax = MinimaxState.from_tensors(tensors)
        if "fixed.attn" in tensors:
            self.masks.fixed_attn = tensors["fixed.attn"].to(self.dist.device)
            self.masks.fixed_ffn = tensors["fixed.ffn"].to(self.dist.device)
            self.start_compensation()
            for option, stored in (("bias_compensation", "comp.attn"), ("reconstruction", "reconstruction.damping")):
                on = getattr(self.ml, option)
                if on != (stored in tensors):
                    raise ConfigError(f"mask_learn: the checkpoint of step {self.step} is in the hardening phase "
                                      f"{'with' if stored in tensors else 'without'} {option.replace('_', ' ')}, "
                                      f"and mask_learn.{option} = {str(on).lower()}; set it back to resume, or "
                                      f"start over with mask_learn.train.resume = \"never\"")
            if self.masks.compensation is not None:
                self.masks.compensation.load(tensors)
            self.start_reconstruction(resumed=True)

    def final_keep(self) -> KeepIndices:
        """The hardening masks as keep indices (scores kept for inspection)."""
        if self.masks.fixed_attn is None:
            self.harden()
        attn, ffn = self.masks.fixed_attn, self.masks.fixed_ffn
        # Fixed masks are 0/1 with exactly k ones per row, so top-k of (mask + tiny score tie-break)
        # returns the same units.
        shape = self.masks.shape
        units = int(attn[0].sum().item())
        width = int(ffn[0].sum().item())
        keep = keep_from_scores(attn.cpu(), ffn.cpu(), shape, units, width, self.masks.mode, "maskprune")
        keep.scores = {"attn": self.masks.attn_scores.detach().cpu(), "ffn": self.masks.ffn_scores.detach().cpu()}
        if self.masks.compensation is not None:
            keep.bias = self.compensation_bias()
        return keep

    # ------------------------------------------------------------------ loop hooks
    stage = "mask_learn"

    @property
    def train_cfg(self) -> TrainLoopConfig:
        return self.ml.train

    def before_step(self) -> None:
        if self.step >= self.hardening_start and self.masks.fixed_attn is None:
            self.harden()

    def log_line(self, stats: dict[str, float]) -> str:
        return (f"loss {stats['loss/total']:.4f} ce {stats['loss/ce']:.4f} "
                f"s_attn {self.minimax.s['attn']:.2f} s_ffn {self.minimax.s['ffn']:.1f} "
                f"z {self.minimax.z:.3f} {stats['throughput/tokens_per_s']:.0f} tok/s")

    def after_validation(self) -> None:
        self.log_layers()


def init_scores(shape: LlamaShape, mode: str, method: str,
                scores: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask scores normalised to mean 1 per layer (the prox threshold's unit, see minimax.py);
    all ones for init = "ones" or when no importance scores were computed."""
    if method == "ones" or scores is None:
        return (torch.ones(shape.num_hidden_layers, attn_unit_count(shape, mode)),
                torch.ones(shape.num_hidden_layers, shape.intermediate_size))
    normed = []
    for kind in ("attn", "ffn"):
        value = scores[kind].float()
        if method == "flap":  # standardised per layer: shifted to start at 0, the ranking kept
            value = value - value.min(dim=1, keepdim=True).values
        value = value.clamp_min(0) + 1e-6
        normed.append(value / value.mean(dim=1, keepdim=True))
    return normed[0], normed[1]


def write_summary(path: Path, source: LlamaShape, keep: KeepIndices, learner: MaskLearner) -> dict[str, Any]:
    final = source.replace(num_attention_heads=keep.q_heads.shape[1],
                           num_key_value_heads=keep.kv_heads.shape[1],
                           intermediate_size=keep.ffn.shape[1])
    prunable_after = final.prunable_params()
    summary = {
        "source_shape": source.hf_overrides(), "final_shape": final.hf_overrides(),
        "params": {"source": source.param_count(), "final": final.param_count(),
                   "prunable_source": source.prunable_params(), "prunable_final": prunable_after},
        "budget": learner.budget.final_budget,  # in the units of target.budget
        "final_violation": max(0.0, final.prunable_cost() - learner.budget.final_budget),
        "target_dims": learner.minimax.s, "steps": learner.step,
    }
    atomic_write_json(path, summary)
    return summary



def assemble_learner(cfg: ExperimentConfig, dist: DistInfo, model: torch.nn.Module, ds: dict[str, Any],
                     train_iter: BatchIterator, valid: TokenShards,
                     scores: dict[str, torch.Tensor] | None, work_dir: Path, tb_dir: Path,
                     meta: dict[str, Any], dev: dict[str, torch.Tensor] | None = None,
                     calibration: list[torch.Tensor] | None = None) -> MaskLearner:
    """Masks and LoRA on the ZeRO-3 model, the engine over the LoRA parameters, the minimax state
    at the dense shape: the one way a MaskLearner is built (the stage and the benchmarks)."""
    shape, cfg = resolve_target(LlamaShape.from_hf_config(model.config), cfg)
    ml, mode = cfg.mask_learn, cfg.target.attn_mode
    masks = MaskState(shape, mode, *init_scores(shape, mode, ml.init, scores)).to(dist.device)
    attach_masks(model, masks)
    if ml.reconstruction:  # before the engine: ZeRO-3 partitions the corrections with the model
        attach_corrections(model, masks, ds)
    lora_switch, lora_params = attach_lora(model, ml.lora, seed=ml.train.seed)
    prepare_for_training(model, ml.activation_checkpointing)
    engine = init_engine(model, lora_params, ds, ml.train)
    budget = BudgetModel(shape, mode, cfg.target.sparsity, ml.budget_warmup_fraction, ml.train.steps)
    explicit = explicit_units(shape, cfg) if cfg.target.arch is not None else None
    if explicit is not None:
        budget.final_budget = float(shape_for(shape, *explicit, mode).prunable_cost())
    minimax = MinimaxState(s={t: float(budget.units[t]) for t in ("attn", "ffn")},
                           y={t: torch.zeros(shape.num_hidden_layers, dtype=torch.float64)
                              for t in ("attn", "ffn")})
    learner = MaskLearner(cfg=cfg, dist=dist, engine=engine, masks=masks, lora=lora_switch,
                          minimax=minimax, budget=budget, train_iter=train_iter, valid=valid, dev=dev or {},
                          checkpointer=Checkpointer(work_dir / "checkpoints", ml.train.keep_last,
                                                    run_root=work_dir.parent),  # work_dir: RUN/mask_learn
                          meta=meta, tb_dir=tb_dir, progress_path=work_dir / "progress.json",
                          explicit_units=explicit, calibration=calibration,
                          reconstruction_dir=work_dir / "reconstruction" if ml.reconstruction else None)
    if ml.distill.kl_weight > 0 or ml.distill.hidden_weight > 0:
        learner.teacher = ShadowTeacher(model, learner.teacher_mode,
                                        logits_wanted=ml.distill.kl_weight > 0).attach()
    return learner

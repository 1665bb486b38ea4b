"""The MaskPrune minimax updates on masks m, shared target dims s and duals y, z (docs/method.md).

    min_{m, s, LoRA} max_{y>=0, z>=0}  f(m, LoRA) + (1/L) Σ_{l,t} y_{l,t} (||m_{l,t}||_0 − s_t)/U_t
                                                  + z (R(s) − B)/R_dense

All quantities are normalised (violations as fractions of U_t, the budget as a fraction of the dense
prunable count, mask step sizes by a running mean |∂f/∂m| per type) because a hard mask gives the
loss no natural scale (METHOD_NOTES 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from maskprune.arch import (AttnMode, LlamaShape, attn_cost_for_units, attn_unit_count,
                            legal_attn_units)

TYPES = ("attn", "ffn")


def prox_l0(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Proximal operator of y·||m||_0 with step lr: hard threshold at sqrt(2·lr·y) (`threshold`,
    per row), then the projection m >= 0 (METHOD_NOTES 1: a signed score must not escape the
    threshold by growing negative)."""
    kept = scores.abs() >= threshold.unsqueeze(-1)
    return torch.where(kept, scores, torch.zeros_like(scores)).clamp_min(0.0)


def dual_ascent(dual: torch.Tensor, violation: torch.Tensor, lr: float) -> torch.Tensor:
    """Projected gradient ascent: grows while the constraint is violated, falls back to 0 once it
    holds with slack."""
    return (dual + lr * violation).clamp_min(0.0)


@dataclass
class MinimaxState:
    """Everything besides LoRA that the minimax updates; saved in every checkpoint."""

    s: dict[str, float]
    y: dict[str, torch.Tensor]
    z: float = 0.0
    grad_scale: dict[str, float] = field(default_factory=dict)
    grad_scale_steps: dict[str, int] = field(default_factory=dict)  # steps that fed grad_scale

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"dual.y.{t}": self.y[t] for t in TYPES}
        out["dual.z"] = torch.tensor([self.z], dtype=torch.float64)
        for t in TYPES:
            out[f"target.s.{t}"] = torch.tensor([self.s[t]], dtype=torch.float64)
            if t in self.grad_scale:
                out[f"grad_scale.{t}"] = torch.tensor([self.grad_scale[t]], dtype=torch.float64)
                out[f"grad_scale_steps.{t}"] = torch.tensor([self.grad_scale_steps[t]], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "MinimaxState":
        return cls(s={t: tensors[f"target.s.{t}"].item() for t in TYPES},
                   y={t: tensors[f"dual.y.{t}"].clone() for t in TYPES},
                   z=tensors["dual.z"].item(),
                   grad_scale={t: tensors[f"grad_scale.{t}"].item() for t in TYPES
                               if f"grad_scale.{t}" in tensors},
                   grad_scale_steps={t: int(tensors[f"grad_scale_steps.{t}"].item()) for t in TYPES
                                     if f"grad_scale_steps.{t}" in tensors})


class BudgetModel:
    """R(s) of the uniform shape with s_attn attention units and s_ffn channels per layer, its
    gradient, and the warmed-up budget B_t."""

    def __init__(self, shape: LlamaShape, mode: AttnMode, sparsity: float, warmup_fraction: float, steps: int):
        self.shape, self.mode = shape, mode
        self.units = {"attn": attn_unit_count(shape, mode), "ffn": shape.intermediate_size}
        self.dense = float(shape.prunable_cost())
        self.final_budget = (1.0 - sparsity) * self.dense
        self.warmup_steps = round(warmup_fraction * steps)  # the same share of any run's length
        self.floor = {"attn": float(legal_attn_units(shape, mode)[0]), "ffn": 1.0}

    def cost(self, s: dict[str, float]) -> float:
        layers = self.shape.num_hidden_layers
        return layers * (attn_cost_for_units(s["attn"], self.shape, self.mode)
                         + self.shape.ffn_cost_per_layer(s["ffn"]))

    def grad(self) -> dict[str, float]:
        """∂R/∂s_t (R is affine in each s_t)."""
        base = self.cost({t: 0.0 for t in TYPES})
        return {t: self.cost({u: float(u == t) for u in TYPES}) - base for t in TYPES}

    def budget(self, step: int) -> float:
        progress = min(1.0, (step + 1) / max(self.warmup_steps, 1))
        return self.dense - progress * (self.dense - self.final_budget)


@dataclass
class StepSizes:
    mask_alpha: float
    dual_layer: float
    dual_budget: float
    target: float
    rho: float  # augmented-Lagrangian weight of the budget term in the s step
    rho_layer: float  # the same for the per-layer terms in the prox threshold (gentler: the
    # threshold cuts every unit below it at once, so a large weight overshoots the target)
    grad_scale_beta: float  # ḡ: the mean of the first 1/(1−β) informative steps, then an EMA
    grad_clip: float  # a unit's |∂f/∂m| counts at most grad_clip · ḡ in the mask step (0: uncapped)


def update_grad_scale(state: MinimaxState, grads: dict[str, torch.Tensor], beta: float) -> None:
    """ḡ_t, the mean |∂f/∂m_t| that normalises the mask step. A running estimate (the mean of the
    first 1/(1−β) informative steps, an exponential average with weight 1−β after): at step 0 the
    student equals its dense self-teacher, so the distillation term's gradient is zero up to
    rounding and a scale taken there alone is the CE gradient's, many times smaller than the
    gradients once units are cut (and rounding noise under pure distillation). Steps whose gradient
    is exactly zero carry no scale and are skipped."""
    for t in TYPES:
        value = grads[t].abs().mean().item()
        if value == 0.0:
            continue
        n = state.grad_scale_steps.get(t, 0) + 1
        weight = max(1.0 - beta, 1.0 / n)
        old = state.grad_scale.get(t, value)
        state.grad_scale[t] = old + weight * (value - old)
        state.grad_scale_steps[t] = n


def minimax_step(scores: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                 state: MinimaxState, budget: BudgetModel, step: int, lr: StepSizes) -> dict[str, float]:
    """One update of m (gradient + prox), s (gradient with the augmented budget term), y and z
    (projected ascent). `scores` are updated in place; returns the quantities worth logging."""
    update_grad_scale(state, grads, lr.grad_scale_beta)
    stats: dict[str, float] = {f"grad/{t}_mean_abs": grads[t].abs().mean().item() for t in TYPES}
    b_t = budget.budget(step)
    r_s = budget.cost(state.s)
    budget_violation = (r_s - b_t) / budget.dense
    # Augmented Lagrangian (METHOD_NOTES 5): the s step sees z + ρ·violation, which damps the
    # s–z double integrator that otherwise swings around the budget. Unlike the prototype it is not
    # clamped at 0: below the budget it pulls s back up, so the budget is used, not only respected
    # (nothing else raises s once pruned units stop resisting).
    z_eff = state.z + lr.rho * budget_violation
    dr = budget.grad()
    for t in TYPES:
        units = budget.units[t]
        m = scores[t]
        scale = state.grad_scale.get(t, 0.0)  # 0 until a step has carried a mask gradient
        step_m = lr.mask_alpha / scale if scale else 0.0
        with torch.no_grad():
            grad = grads[t]
            if lr.grad_clip > 0 and scale:
                # One batch's STE gradient is heavy-tailed per unit (single units at 30-40x the mean):
                # uncapped, one batch moves a unit across the prox threshold on its own and the final
                # selection follows the last few batches' noise, not the run's evidence.
                grad = grad.clamp(-lr.grad_clip * scale, lr.grad_clip * scale)
            m.sub_(step_m * grad)
            counts = (m > 0).sum(1).to(torch.float64).cpu()  # duals live on the CPU, m may not
            violation = (counts - state.s[t]) / units
            y_eff = (state.y[t] + lr.rho_layer * violation).clamp_min(0.0)
            # Threshold in normalised units: scores start with mean 1 per layer, so y_eff ≈ 0.5
            # cuts units below 1.
            threshold = torch.sqrt(2.0 * y_eff).to(m.device, m.dtype)
            m.copy_(prox_l0(m, threshold))
            counts = (m > 0).sum(1).to(torch.float64).cpu()
            violation = (counts - state.s[t]) / units
        state.y[t] = dual_ascent(state.y[t], violation, lr.dual_layer)
        # ∂L/∂(s_t/U_t): the layers' duals (averaged over layers, so step sizes do not depend on
        # depth) push the target up, the budget dual times the type's parameter share pushes it down.
        grad_s = -state.y[t].mean().item() + z_eff * dr[t] * units / budget.dense
        state.s[t] = min(float(units), max(budget.floor[t], state.s[t] - lr.target * units * grad_s))
        stats[f"sparsity/violation/{t}"] = violation.clamp_min(0).max().item()
        stats[f"dual/y_{t}_mean"] = state.y[t].mean().item()
        stats[f"dual/y_{t}_max"] = state.y[t].max().item()
        stats[f"target_dims/{t}"] = state.s[t]
        stats[f"kept/{t}_mean"] = counts.mean().item()
    state.z = max(0.0, state.z + lr.dual_budget * budget_violation)
    stats.update({"dual/z": state.z, "sparsity/violation/budget": max(0.0, budget_violation),
                  "sparsity/budget_ratio": b_t / budget.dense,
                  "sparsity/params_ratio": budget.cost(state.s) / budget.dense})
    return stats

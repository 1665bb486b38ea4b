"""LoRA adapters attached as child modules of the frozen Linear layers, switchable off for the
teacher pass (distillation from the LoRA-free model itself, no second copy of the weights).

Live names: `model.layers.{l}.self_attn.q_proj.lora_A.weight`; saved in PEFT's layout so the
adapter also loads with `peft.PeftModel.from_pretrained`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from maskprune.config import LoraConfig
from maskprune.dist import gathered
from maskprune.families import ATTN_PROJ, MLP_PROJ, family_of


class LoraSwitch:
    """Shared on/off flag read by every adapter hook at call time."""

    def __init__(self) -> None:
        self.enabled = True


def _lora_hook(switch: LoraSwitch, scale: float):
    def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if not switch.enabled:
            return output
        # Read the adapters through the module: under ZeRO-3 they are gathered only when used.
        return output + module.lora_B(module.lora_A(module.lora_dropout(inputs[0]))) * scale
    return hook


def target_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    family = family_of(model.config)
    found = {}
    for index, layer in enumerate(model.model.layers):
        for proj in targets:
            if proj not in ATTN_PROJ + MLP_PROJ:
                raise ValueError(f"mask_learn.lora.targets: {proj!r} is not a projection of the model; "
                                 f"use {' '.join(ATTN_PROJ + MLP_PROJ)}")
            found[f"model.layers.{index}.{family.proj_name(proj)}"] = layer.get_submodule(family.proj_name(proj))
    return found


def attach_lora(model: nn.Module, cfg: LoraConfig, seed: int) -> tuple[LoraSwitch, list[nn.Parameter]]:
    """Add A (Kaiming) and B (zeros) to every target so the model starts exactly as before."""
    switch = LoraSwitch()
    generator = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    dtype = next(model.parameters()).dtype
    for linear in target_linears(model, cfg.targets).values():
        linear.lora_A = nn.Linear(linear.in_features, cfg.rank, bias=False, dtype=dtype)
        linear.lora_B = nn.Linear(cfg.rank, linear.out_features, bias=False, dtype=dtype)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(linear.in_features)
            linear.lora_A.weight.copy_(torch.empty_like(linear.lora_A.weight).uniform_(
                -bound, bound, generator=generator))
            linear.lora_B.weight.zero_()
        # A child module, so that the model's eval mode (validation, dev scoring) switches it off.
        linear.lora_dropout = (nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()).train(linear.training)
        linear.register_forward_hook(_lora_hook(switch, cfg.alpha / cfg.rank))
        params += [linear.lora_A.weight, linear.lora_B.weight]
    return switch, params


def lora_state_dict(model: nn.Module, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Full LoRA tensors in PEFT key layout; under ZeRO-3 every rank must call this (it gathers
    each linear's pair at once: one collective per projection, 560 on a 70B)."""
    state = {}
    for name, linear in target_linears(model, cfg.targets).items():
        weights = {part: getattr(linear, part).weight for part in ("lora_A", "lora_B")}
        with gathered(list(weights.values())):
            for part, weight in weights.items():
                state[f"base_model.model.{name}.{part}.weight"] = weight.detach().float().cpu().clone()
    return state


def save_adapter(folder: Path, state: dict[str, torch.Tensor], cfg: LoraConfig, base_model: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets), "bias": "none",
              "base_model_name_or_path": base_model, "fan_in_fan_out": False,
              "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

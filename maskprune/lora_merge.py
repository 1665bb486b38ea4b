"""LoRA deltas to merge into base weights before slicing: W + scale · B @ A.

Two places hold adapters: the PEFT folder the mask-learn stage publishes, and the mask-learn
ZeRO-3 checkpoint itself (child modules `<linear>.lora_A` / `<linear>.lora_B` of the engine model).
Both become one `LoraAdapter` keyed by the base weight's name.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from maskprune.safetensors_io import SafetensorsDir

PEFT_PREFIX = "base_model.model."


class LoraError(ValueError):
    """An adapter that cannot be merged; the message names the file or tensor."""


@dataclass
class LoraAdapter:
    scale: float
    pairs: dict[str, tuple[str, str]]  # base weight name -> (lora_A name, lora_B name)
    read: Callable[[str], torch.Tensor]

    @classmethod
    def from_names(cls, names: list[str], read: Callable[[str], torch.Tensor], scale: float,
                   prefix: str = "", where: str = "") -> "LoraAdapter":
        pairs: dict[str, tuple[str, str]] = {}
        names_set = set(names)
        for name in names:
            if not name.endswith(".lora_A.weight"):
                continue
            module = name[len(prefix):-len(".lora_A.weight")] if name.startswith(prefix) else None
            b_name = name[:-len("lora_A.weight")] + "lora_B.weight"
            if module is None or b_name not in names_set:
                raise LoraError(f"{where}: {name} has no matching lora_B (or prefix {prefix!r})")
            pairs[module + ".weight"] = (name, b_name)
        return cls(scale=scale, pairs=pairs, read=read)

    @classmethod
    def from_peft_dir(cls, folder: str | Path) -> "LoraAdapter":
        folder = Path(folder)
        config_path = folder / "adapter_config.json"
        if not config_path.is_file():
            raise LoraError(f"{folder}: no adapter_config.json; expected a PEFT LoRA adapter folder")
        config = json.loads(config_path.read_text())
        if config.get("use_dora"):
            raise LoraError(f"{config_path}: DoRA adapters are not a plain W + BA merge; not supported")
        weights = SafetensorsDir(folder)
        return cls.from_names(weights.names(), weights.get,
                              lora_scale(config["r"], config["lora_alpha"], config.get("use_rslora", False)),
                              prefix=PEFT_PREFIX, where=str(folder))

    def delta(self, base_name: str) -> torch.Tensor | None:
        """scale · B @ A in fp32 for one base weight, or None if that weight has no adapter."""
        if base_name not in self.pairs:
            return None
        a_name, b_name = self.pairs[base_name]
        return self.scale * (self.read(b_name).float() @ self.read(a_name).float())


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r (alpha / sqrt(r) for rsLoRA)."""
    return alpha / (math.sqrt(rank) if rslora else rank)

"""One-shot baselines on the same uniform shape: score units once, cut every layer to the target."""
from __future__ import annotations

import torch

from maskprune.arch import LlamaShape
from maskprune.config import ExperimentConfig
from maskprune.importance import flap_bias, unit_scores
from maskprune.masks_io import KeepIndices, keep_from_scores
from maskprune.targets import one_shot_units


def one_shot_keep(model: torch.nn.Module, batches: list[torch.Tensor], cfg: ExperimentConfig,
                  shape: LlamaShape) -> KeepIndices:
    """Keep indices of `mask_learn.method` (magnitude, wanda_sp, flap, taylor, random); FLAP also
    gets its bias compensation. Every rank must call it (it gathers ZeRO-3 weights)."""
    method, mode = cfg.mask_learn.method, cfg.target.attn_mode
    scores = unit_scores(model, batches, method, shape, mode, seed=cfg.mask_learn.train.seed,
                         checkpointing=cfg.mask_learn.activation_checkpointing)
    attn_units, ffn_width = one_shot_units(shape, cfg)
    keep = keep_from_scores(scores["attn"], scores["ffn"], shape, attn_units, ffn_width, mode, method)
    if method == "flap":
        keep.bias = {name.removeprefix("bias."): value
                     for name, value in flap_bias(model, batches, keep).items()}
    return keep

"""Structured masks applied exactly where hard-prune slices, with a straight-through estimator.

- attention: per query head, on the input of `o_proj` (the concatenated per-head outputs), so a
  zeroed head is exactly a removed o_proj column block (and, in kv_group mode, a removed KV head);
- FFN: per channel, on the input of `down_proj`, i.e. on act(gate)·up.

The scores m are plain replicated tensors outside the DeepSpeed engine (tiny next to the model:
2.3M floats for a 70B model), so no ZeRO-3 shard is ever captured; hooks read them through this
module's attributes at call time. Forward uses the hard mask 1[m > 0]; backward passes dL/dmask to
m unchanged (identity STE).
"""
from __future__ import annotations

import torch
from torch import nn

from maskprune.arch import AttnMode, LlamaShape, attn_unit_count, head_mask_from_units
from maskprune.compensation import RemovedChannelMeans
from maskprune.families import FAMILIES


TIE_BREAK = 1e-6


class MaskState(nn.Module):
    def __init__(self, shape: LlamaShape, mode: AttnMode, init_attn: torch.Tensor | None = None,
                 init_ffn: torch.Tensor | None = None):
        super().__init__()
        layers = shape.num_hidden_layers
        self.shape, self.mode = shape, mode
        units = attn_unit_count(shape, mode)
        self.attn_scores = nn.Parameter(
            init_attn.clone().float() if init_attn is not None else torch.ones(layers, units))
        self.ffn_scores = nn.Parameter(
            init_ffn.clone().float() if init_ffn is not None else torch.ones(layers, shape.intermediate_size))
        # The starting scores, kept to rank units the minimax zeroed (they all tie at 0) when the
        # final top-k has to take some of them back.
        self.register_buffer("prior_attn", self.attn_scores.detach().clone(), persistent=False)
        self.register_buffer("prior_ffn", self.ffn_scores.detach().clone(), persistent=False)
        # enabled=False: the dense teacher pass. fixed_*: the hardening phase's final masks.
        self.enabled = True
        self.fixed_attn: torch.Tensor | None = None
        self.fixed_ffn: torch.Tensor | None = None
        # With bias compensation, from hardening on: removed channels get their mean, not zero.
        self.compensation: RemovedChannelMeans | None = None
        # With reconstruction, from hardening on: o_proj / down_proj add their kept columns' Δ
        # (maskprune/reconstruction.py).
        self.corrected = False

    @staticmethod
    def ste(scores: torch.Tensor) -> torch.Tensor:
        hard = (scores > 0).to(scores.dtype)
        return hard + (scores - scores.detach())

    def unit_mask(self, kind: str, layer: int) -> torch.Tensor:
        fixed = self.fixed_attn if kind == "attn" else self.fixed_ffn
        if fixed is not None:
            return fixed[layer]
        scores = self.attn_scores if kind == "attn" else self.ffn_scores
        return self.ste(scores[layer])

    def ranking_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores for the final per-layer top-k: the learned scores, ties broken by the prior (its
        weight is far below any learned difference, so it only orders exact ties such as zeros)."""
        return tuple((scores.detach() + TIE_BREAK * prior / prior.max().clamp_min(1e-12)).cpu()
                     for scores, prior in ((self.attn_scores, self.prior_attn),
                                           (self.ffn_scores, self.prior_ffn)))

    def head_mask(self, layer: int) -> torch.Tensor:
        return head_mask_from_units(self.unit_mask("attn", layer), self.shape, self.mode)

    def apply(self, kind: str, layer: int, x: torch.Tensor, channel_mask: torch.Tensor) -> torch.Tensor:
        """The input of o_proj ("attn") or down_proj ("ffn") as the pruned model will see it."""
        if self.compensation is not None:  # set by hardening, with the fixed masks
            return self.compensation.replace(kind, layer, x, channel_mask)
        return x * channel_mask.to(x.dtype)

    def removed_channels(self) -> dict[str, torch.Tensor]:
        """1.0 where the hardening masks remove an input channel of o_proj ("attn", [L, heads·head_dim])
        or of down_proj ("ffn", [L, ffn])."""
        heads = head_mask_from_units(self.fixed_attn, self.shape, self.mode)
        return {"attn": 1 - heads.repeat_interleave(self.shape.head_dim, dim=1), "ffn": 1 - self.fixed_ffn}

    def kept_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """||m_l||_0 per layer for each type: the quantity the per-layer constraints bound."""
        return (self.attn_scores > 0).sum(1).cpu(), (self.ffn_scores > 0).sum(1).cpu()


def _o_proj_hook(state: MaskState, layer: int, head_dim: int):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if not state.enabled:
            return inputs
        channel_mask = state.head_mask(layer).repeat_interleave(head_dim)
        return (state.apply("attn", layer, inputs[0], channel_mask), *inputs[1:])
    return hook


def _down_proj_hook(state: MaskState, layer: int):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if not state.enabled:
            return inputs
        return (state.apply("ffn", layer, inputs[0], state.unit_mask("ffn", layer)), *inputs[1:])
    return hook


def masked_linears(model: nn.Module, shape: LlamaShape) -> dict[str, list[nn.Linear]]:
    """Per layer, the projection whose input each mask type gates: o_proj ("attn"), down_proj ("ffn")."""
    family = FAMILIES[shape.family]  # where o_proj / down_proj live in its decoder layers
    return {"attn": [family.attn_module(layer).o_proj for layer in model.model.layers],
            "ffn": [family.mlp_module(layer).down_proj for layer in model.model.layers]}


def attach_masks(model: nn.Module, state: MaskState) -> list[torch.utils.hooks.RemovableHandle]:
    linears = masked_linears(model, state.shape)
    handles = []
    for index, (o_proj, down_proj) in enumerate(zip(linears["attn"], linears["ffn"])):
        handles.append(o_proj.register_forward_pre_hook(_o_proj_hook(state, index, state.shape.head_dim)))
        handles.append(down_proj.register_forward_pre_hook(_down_proj_hook(state, index)))
    return handles


def fixed_masks_from_keep(keep_q: torch.Tensor, keep_ffn: torch.Tensor, shape: LlamaShape,
                          mode: AttnMode) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 unit masks [L, U] and [L, I] equal to a set of keep indices."""
    layers = keep_q.shape[0]
    attn = torch.zeros(layers, attn_unit_count(shape, mode))
    if mode == "query_per_group":
        attn.scatter_(1, keep_q, 1.0)
    else:
        attn.scatter_(1, torch.div(keep_q, shape.group_size, rounding_mode="floor"), 1.0)
    ffn = torch.zeros(layers, shape.intermediate_size).scatter_(1, keep_ffn, 1.0)
    return attn, ffn

"""Bias compensation learned with the masks: FLAP's replacement of removed channels by their mean,
run inside MaskPrune's hardening phase.

FLAP replaces each removed input channel of o_proj / down_proj by its mean over calibration text and
folds W[:, removed] @ mean into a bias. Here the hardening forward does the same replacement, so:
- the means are those of every hardening token seen so far, over all ranks, measured where they occur,
  i.e. in the model whose earlier layers are already pruned and compensated (FLAP's sequential
  means, without its extra passes over calibration data);
- LoRA trains with the compensation the pruned checkpoint will carry, not against its absence;
- at the end, bias = (W + s·BA)[:, removed] @ mean is exactly what the forward added, so the
  exported model equals the model LoRA trained (hard-prune's equivalence check holds).

The output then has o_proj / down_proj biases, i.e. `attention_bias` and `mlp_bias` (HF Llama adds
zero q/k/v and gate/up biases with them): a plain HF Llama checkpoint that continued training can
also train. State: per-layer float64 channel sums and a token count (L × (heads·head_dim + ffn)
values: 2.9M, 24 MB at 70B), all-reduced once per optimizer step and saved with the checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn

from maskprune.dist import gathered

KINDS = ("attn", "ffn")  # o_proj's input channels (heads × head_dim), down_proj's (FFN channels)


class RemovedChannelMeans:
    """Running means of the inputs of o_proj ("attn") and down_proj ("ffn"), per layer and channel."""

    def __init__(self, layers: int, channels: dict[str, int], device: torch.device):
        self.sums = {kind: torch.zeros(layers, channels[kind], dtype=torch.float64, device=device)
                     for kind in KINDS}
        self.tokens = 0.0  # every rank's, committed steps only; a float so hooks never sync the device
        self._pending = {kind: torch.zeros_like(self.sums[kind]) for kind in KINDS}
        self._pending_tokens = 0
        # The current micro-batch's sums, overwritten per call: a recomputed forward (activation
        # checkpointing) sees the same batch and leaves the same values.
        self._batch: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in KINDS}
        self._batch_tokens = 0

    def replace(self, kind: str, layer: int, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`x` with its removed channels (keep == 0) set to their mean; kept ones masked as usual."""
        training = torch.is_grad_enabled()  # a training forward; validation does not feed the means
        if training or not self.tokens:
            flat = x.detach().reshape(-1, x.shape[-1])
            # Reduced in float64 without a float64 copy of the activations (1 GiB per 70B FFN layer).
            batch_sum = flat.sum(0, dtype=torch.float64)
            if training:
                self._batch[kind][layer] = batch_sum
                self._batch_tokens = flat.shape[0]
        # Before the first step is committed (the first hardening batch), the batch's own mean.
        mean = self.mean(kind, layer) if self.tokens else batch_sum / flat.shape[0]
        keep = keep.to(x.dtype)
        return torch.addcmul(((1 - keep) * mean.to(x.dtype)), x, keep)  # one activation-sized output

    def end_micro_batch(self) -> None:
        for kind in KINDS:
            for layer, sums in self._batch[kind].items():
                self._pending[kind][layer] += sums
            self._batch[kind].clear()
        self._pending_tokens += self._batch_tokens
        self._batch_tokens = 0

    def end_step(self) -> None:
        """Adds this step's sums of every rank: from here all ranks replace with the same means."""
        tokens = torch.tensor([float(self._pending_tokens)], dtype=torch.float64,
                              device=self._pending["attn"].device)
        if torch.distributed.is_initialized():
            for tensor in (self._pending["attn"], self._pending["ffn"], tokens):
                torch.distributed.all_reduce(tensor)
        for kind in KINDS:
            self.sums[kind] += self._pending[kind]
            self._pending[kind].zero_()
        self.tokens += tokens.item()
        self._pending_tokens = 0

    def mean(self, kind: str, layer: int) -> torch.Tensor:
        if not self.tokens:
            raise RuntimeError("bias compensation: no hardening step has run, so there are no means; "
                               "set mask_learn.hardening_fraction > 0")
        return self.sums[kind][layer] / self.tokens

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"comp.attn": self.sums["attn"], "comp.ffn": self.sums["ffn"],
                "comp.tokens": torch.tensor(self.tokens, dtype=torch.float64)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for kind in KINDS:
            self.sums[kind].copy_(tensors[f"comp.{kind}"])
        self.tokens = float(tensors["comp.tokens"])


def compensation_bias(linears: dict[str, list[nn.Linear]], removed: dict[str, torch.Tensor],
                      means: RemovedChannelMeans, lora_scale: float) -> dict[str, torch.Tensor]:
    """{"o_proj": [L, hidden], "down_proj": [L, hidden]}: (W + s·BA) @ (removed · mean) per layer, the
    bias hard-prune writes. `linears` maps "attn"/"ffn" to each layer's o_proj/down_proj (with their
    LoRA children, if any); `removed` holds 1.0 for removed channels [L, channels]. Every rank must
    call it (ZeRO-3 gathers one projection at a time)."""
    out: dict[str, torch.Tensor] = {}
    for kind, name in (("attn", "o_proj"), ("ffn", "down_proj")):
        rows = []
        for layer, linear in enumerate(linears[kind]):
            vector = removed[kind][layer].to(means.sums[kind].device, torch.float64) * means.mean(kind, layer)
            lora = [linear.lora_A.weight, linear.lora_B.weight] if hasattr(linear, "lora_A") else []
            with gathered([linear.weight, *lora]):
                bias = linear.weight.detach().double() @ vector
                if lora:
                    bias += lora_scale * (lora[1].detach().double() @ (lora[0].detach().double() @ vector))
            rows.append(bias.float().cpu())
        out[name] = torch.stack(rows)
    return out

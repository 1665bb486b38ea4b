"""The keep-index file every pruning method writes and hard-prune reads (masks.safetensors).

Tensors (L = source layers; every row has the same length, which is what makes the shape uniform):
    keep.q_heads  int64 [L, n_q']    kept query heads, sorted
    keep.kv_heads int64 [L, n_kv']   kept KV heads, sorted
    keep.ffn      int64 [L, I']      kept FFN channels, sorted
    keep.hidden   int64 [d']         kept hidden channels (optional; absent = all)
    keep.layers   int64 [L']         kept layers (optional; absent = all)
    score.attn    float32 [L, U]     final attention-unit scores (optional)
    score.ffn     float32 [L, I]     final FFN-channel scores (optional)
    bias.o_proj   float32 [L, d]     bias compensation added to o_proj's output (optional, FLAP)
    bias.down_proj float32 [L, d]    bias compensation added to down_proj's output (optional, FLAP)
Metadata: format, method, attn_mode.

The bias.* tensors are the removed channels' mean contribution (`importance.flap_bias`), over the
source's layers and hidden channels; hard-prune adds them to the pruned projections' biases.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from maskprune.arch import LlamaShape

FORMAT = "maskprune.masks/1"
BIAS_NAMES = ("o_proj", "down_proj")


@dataclass
class KeepIndices:
    q_heads: torch.Tensor
    kv_heads: torch.Tensor
    ffn: torch.Tensor
    method: str
    attn_mode: str
    hidden: torch.Tensor | None = None
    layers: torch.Tensor | None = None
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # "o_proj" / "down_proj" -> [L, d]

    def validate(self) -> None:
        rows = {self.q_heads.shape[0], self.kv_heads.shape[0], self.ffn.shape[0]}
        if len(rows) != 1:
            raise ValueError(f"keep indices disagree on the layer count: {sorted(rows)}")
        for name in ("q_heads", "kv_heads", "ffn"):
            t = getattr(self, name)
            if t.dim() != 2 or not bool((t[:, 1:] > t[:, :-1]).all()):
                raise ValueError(f"keep.{name} must be [layers, k] with sorted unique rows")
        for name, value in self.bias.items():
            if name not in BIAS_NAMES or value.dim() != 2 or value.shape[0] != self.q_heads.shape[0]:
                raise ValueError(f"bias.{name}: expected one of bias.{', bias.'.join(BIAS_NAMES)} "
                                 f"shaped [{self.q_heads.shape[0]}, hidden], got {tuple(value.shape)}")


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The channels of these heads in the concatenated head outputs (q_proj's rows, o_proj's inputs)."""
    return (heads.long().unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def save_keep_indices(path: Path, keep: KeepIndices) -> None:
    keep.validate()
    tensors = {"keep.q_heads": keep.q_heads, "keep.kv_heads": keep.kv_heads, "keep.ffn": keep.ffn}
    if keep.hidden is not None:
        tensors["keep.hidden"] = keep.hidden
    if keep.layers is not None:
        tensors["keep.layers"] = keep.layers
    for name, value in keep.scores.items():
        tensors[f"score.{name}"] = value.float()
    for name, value in keep.bias.items():
        tensors[f"bias.{name}"] = value.float()
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"format": FORMAT, "method": keep.method, "attn_mode": keep.attn_mode})
    tmp.replace(path)


def load_keep_indices(path: Path) -> KeepIndices:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no masks file; run the mask_learn stage first")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a maskprune masks file (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    keep = KeepIndices(
        q_heads=tensors["keep.q_heads"], kv_heads=tensors["keep.kv_heads"], ffn=tensors["keep.ffn"],
        method=meta.get("method", ""), attn_mode=meta.get("attn_mode", ""),
        hidden=tensors.get("keep.hidden"), layers=tensors.get("keep.layers"),
        scores={k[len("score."):]: v for k, v in tensors.items() if k.startswith("score.")},
        bias={k[len("bias."):]: v for k, v in tensors.items() if k.startswith("bias.")})
    keep.validate()
    return keep


def keep_from_scores(attn_scores: torch.Tensor, ffn_scores: torch.Tensor, shape: "LlamaShape",
                     attn_units: int, ffn_width: int, mode: str, method: str) -> KeepIndices:
    """Every layer keeps exactly `attn_units` / `ffn_width` of its own highest-scoring units.

    attn_scores: [L, U] per attention unit (query heads, or KV groups in kv_group mode);
    ffn_scores: [L, I]. In query_per_group mode the top heads are taken inside each KV group, so
    every group keeps attn_units / n_kv heads and all KV heads survive."""
    layers = attn_scores.shape[0]
    group = shape.group_size
    n_kv = shape.num_key_value_heads
    q_rows, kv_rows = [], []
    for layer in range(layers):
        scores = attn_scores[layer].float()
        if mode == "query_per_group":
            per_group = attn_units // n_kv
            grouped = scores.view(n_kv, group)
            top = grouped.topk(per_group, dim=1).indices + torch.arange(n_kv).unsqueeze(1) * group
            q_rows.append(top.flatten().sort().values)
            kv_rows.append(torch.arange(n_kv))
        else:
            kv = scores.topk(attn_units).indices.sort().values
            kv_rows.append(kv)
            q_rows.append((kv.unsqueeze(1) * group + torch.arange(group)).flatten())
    ffn = ffn_scores.float().topk(ffn_width, dim=1).indices.sort(dim=1).values
    return KeepIndices(q_heads=torch.stack(q_rows).long(), kv_heads=torch.stack(kv_rows).long(),
                       ffn=ffn.long(), method=method, attn_mode=mode,
                       scores={"attn": attn_scores.float().cpu(), "ffn": ffn_scores.float().cpu()})

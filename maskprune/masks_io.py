"""The keep-index file every pruning method writes and hard-prune reads (masks.safetensors).

Tensors (L = source layers; every row has the same length, which is what makes the shape uniform):
    keep.q_heads  int64 [L, n_q']    kept query heads, sorted
    keep.kv_heads int64 [L, n_kv']   kept KV heads, sorted
    keep.ffn      int64 [L, I']      kept FFN channels, sorted
    keep.hidden   int64 [d']         kept hidden channels (optional; absent = all)
    keep.layers   int64 [L']         kept layers (optional; absent = all)
    score.attn    float32 [L, U]     final attention-unit scores (optional)
    score.ffn     float32 [L, I]     final FFN-channel scores (optional)
Metadata: format, method, attn_mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "maskprune.masks/1"


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

    def validate(self) -> None:
        rows = {self.q_heads.shape[0], self.kv_heads.shape[0], self.ffn.shape[0]}
        if len(rows) != 1:
            raise ValueError(f"keep indices disagree on the layer count: {sorted(rows)}")
        for name in ("q_heads", "kv_heads", "ffn"):
            t = getattr(self, name)
            if t.dim() != 2 or not bool((t[:, 1:] > t[:, :-1]).all()):
                raise ValueError(f"keep.{name} must be [layers, k] with sorted unique rows")


def save_keep_indices(path: Path, keep: KeepIndices) -> None:
    keep.validate()
    tensors = {"keep.q_heads": keep.q_heads, "keep.kv_heads": keep.kv_heads, "keep.ffn": keep.ffn}
    if keep.hidden is not None:
        tensors["keep.hidden"] = keep.hidden
    if keep.layers is not None:
        tensors["keep.layers"] = keep.layers
    for name, value in keep.scores.items():
        tensors[f"score.{name}"] = value.float()
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
        scores={k[len("score."):]: v for k, v in tensors.items() if k.startswith("score.")})
    keep.validate()
    return keep

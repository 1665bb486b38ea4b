"""Least-squares reconstruction of the kept channels, computed when the masks harden.

Cutting the input channels R of o_proj / down_proj loses W[:, R] x_R. Per layer and projection,
with H = Σ x xᵀ over calibration inputs, the kept columns S that best reproduce the dense output
W x are W'_S = W_S + Δ, Δ = W_R H[R, S] (H[S, S] + λI)⁻¹: the removed channels' contribution
predicted from the kept ones, with a ridge λ = damping · mean diag H[S, S] on Δ (so the corrected
cut is never worse than the plain cut on the fit's inputs, and a large damping means no Δ); docs/method.md,
"Least-squares reconstruction of the kept channels", has the probe that measured it.

The dense self-teacher shares the student's weights, so the change lives beside them: a frozen
`maskprune_correction` Linear child of every o_proj / down_proj holding Δ = W'_S − W_S on the kept
columns (zeros elsewhere), whose output is added only while the masks are on. It is created
zero, partitioned by ZeRO-3 like any frozen weight (Llama-3-70B, o_proj + down_proj: 0.70 GB per
GPU in bf16 on 64 GPUs), and used only from hardening on. `reconstruct` fills it sequentially, as FLAP computes its
means: a layer's H is measured in the model whose earlier layers are already cut and corrected, so
each correction also absorbs the shift of the earlier ones. LoRA is off during the pass: Δ depends
only on the frozen weights, the hardening masks and the calibration batches.

The kept columns of Δ (in the model's dtype: exactly what the student adds) go to one safetensors
file per layer in RUN/mask_learn/reconstruction/, written once, beside the column indices they
belong to; hard-prune adds them to the merged weights (`CorrectedSource`), and a resumed hardening
phase loads them instead of recomputing.

Memory: the pass holds this rank's calibration hidden states (as FLAP's does) and one H at a time,
float32 (Llama-3-70B down_proj: 28,672² = 3.3 GB) plus its float64 solve on the kept block.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from maskprune.dist import gathered
from maskprune.importance import (_advance, _all_reduce_, _batch_list, _decoder_inputs, eval_mode,
                                  _layers, _world, _zero3_gathering)
from maskprune.masking import MaskState, masked_linears
from maskprune.masks_io import KeepIndices, head_channels
from maskprune.watchdog import WATCHDOG

FORMAT = "maskprune.reconstruction/1"
MANIFEST = "reconstruction.json"
KINDS = ("attn", "ffn")  # o_proj's input channels, down_proj's


class ReconstructionError(ValueError):
    """A reconstruction folder that does not belong to the masks or weights it is used with."""


class Correction(nn.Linear):
    """Δ on a projection's kept input columns: zeros until `reconstruct` fills it."""

    filled = False  # set where `reconstruct` / `load_corrections` wrote a Δ (same on every rank)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


def _correction_hook(state: MaskState):
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        # The input is the masked one (the mask pre-hook ran); the teacher (masks off) never sees Δ,
        # and a projection with nothing cut (all its heads kept) is not gathered for a zero Δ.
        if not (state.enabled and state.corrected and module.maskprune_correction.filled):
            return output
        return output + module.maskprune_correction(inputs[0])  # a module call: ZeRO-3 gathers Δ
    return hook


def attach_corrections(model: nn.Module, state: MaskState, ds: dict[str, Any] | None = None) -> None:
    """A zero, frozen Correction on every o_proj and down_proj. On a ZeRO-3 model each is
    partitioned as it is built (zero.Init with the run's DeepSpeed config), so no rank ever holds
    more than one full projection's worth (70B down_proj: 470 MB in bf16) on top of its partition."""
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    dtype = next(model.parameters()).dtype
    linears = masked_linears(model, state.shape)
    if partitioned:
        import deepspeed

        # No dtype= here: DeepSpeed 0.19.8's zero.Init honours an explicit dtype only where the
        # accelerator reports fp16 support (GPUs; CPUs whose oneDNN has fp16) and elsewhere (an AMD
        # EPYC) builds bf16 whatever is asked, so an fp32 run's Δ met fp32 inputs as bf16 and the
        # refit died. Without one it takes the config's precision: the one the model was built in.
        context: AbstractContextManager[Any] = deepspeed.zero.Init(config_dict_or_path=ds)
    else:
        context = nullcontext()
    with context:
        for linear in linears["attn"] + linears["ffn"]:
            linear.maskprune_correction = Correction(linear.in_features, linear.out_features, bias=False,
                                                     dtype=dtype, device=linear.weight.device)
    built = {linear.maskprune_correction.weight.dtype for linear in linears["attn"] + linears["ffn"]}
    if built != {dtype}:
        raise ReconstructionError(f"the corrections were built in {', '.join(map(str, built))} where the model's "
                                  f"weights are {dtype}; the DeepSpeed config's precision (bf16 / fp16) must be "
                                  "the one the model was built with")
    for linear in linears["attn"] + linears["ffn"]:
        linear.maskprune_correction.requires_grad_(False)
        linear.register_forward_hook(_correction_hook(state))


def _fill(correction: Correction, columns: Tensor, value: Tensor) -> None:
    """Δ = 0 except Δ[:, columns] = value; every rank calls it with the same value (rank 0's is the
    one ZeRO-3 re-partitions)."""
    weight = correction.weight
    if hasattr(weight, "ds_id"):
        import deepspeed

        context: AbstractContextManager[Any] = deepspeed.zero.GatheredParameters([weight], modifier_rank=0)
    else:
        context = nullcontext()
    with context, torch.no_grad():
        weight.zero_()
        weight[:, columns.to(weight.device)] = value.to(weight.device, weight.dtype)
    correction.filled = True


def solve(gram: Tensor, weight: Tensor, kept: Tensor, damping: float) -> tuple[Tensor, dict[str, float]]:
    """Δ on the kept columns (float32 [out, |kept|]) and the relative output errors of the cut
    without and with it on `gram`'s inputs (‖(W − W')x‖² / ‖Wx‖², summed over them). The solve is
    float64 on the kept block only; the rest stays float32 (70B down_proj: ~8 GB transient)."""
    weight = weight.float()
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[kept] = False
    # Index both axes at once: gram[kept][:, …] would first copy H[S, :] (70B down_proj: 1.6 GB).
    rows, removed = kept.to(gram.device).unsqueeze(1), removed.nonzero().flatten().to(gram.device)
    block = gram[rows, rows.T].double()
    block.diagonal().add_(damping * block.diagonal().mean().clamp_min(1e-30))
    chol, info = torch.linalg.cholesky_ex(block)
    if int(info) != 0:  # only with damping 0 and a kept channel that never fired
        raise ReconstructionError("mask_learn.reconstruction: the kept channels' input covariance is "
                                  "singular; raise mask_learn.reconstruction_damping above 0")
    # The ridge term penalises Δ, not W'_S: a ridge on W'_S would shrink weak kept channels towards
    # zero and could end worse than no correction (measured: layers whose cut lost almost nothing).
    rhs = (gram[rows, removed] @ weight[:, removed].T).double()  # H[S, R] W_Rᵀ, [|S|, out]
    delta = torch.cholesky_solve(rhs, chol).T.float()           # Δ = W_R H[R, S] (H[S, S] + λI)⁻¹
    del block, chol, rhs
    dense = float(((weight @ gram) * weight).sum().clamp_min(1e-30))

    def error(kept_weight: Tensor) -> float:
        diff = weight.clone()
        diff[:, kept] -= kept_weight
        return float(((diff @ gram) * diff).sum()) / dense

    kept_weight = weight[:, kept]
    return delta, {"cut": error(kept_weight), "corrected": error(kept_weight + delta)}


def _kept_columns(state: MaskState) -> dict[str, list[Tensor]]:
    removed = state.removed_channels()
    return {kind: [(row == 0).nonzero().flatten().cpu() for row in removed[kind]] for kind in KINDS}


def reconstruct(model: nn.Module, state: MaskState, batches: Iterable[Tensor], damping: float,
                out_dir: Path | None = None, is_rank0: bool = True) -> dict[str, list[dict[str, float]]]:
    """Fill every Correction for the fixed masks in `state`, layer after layer; returns per kind, for
    each layer where that kind was cut, the relative output errors of the cut without / with the
    correction ({"layer", "cut", "corrected"}; every rank alike).
    Every rank must call it with as many batches. LoRA must be off; the masks' fixed masks set.
    With `out_dir`, rank 0 writes the folder `load_corrections` reads (complete or not at all)."""
    device = next(model.parameters()).device
    batches = _batch_list(batches, device)
    linears = masked_linears(model, state.shape)
    kept = _kept_columns(state)
    names = {id(m): name for name, m in model.named_modules()}
    errors: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    staging = None
    if out_dir is not None and is_rank0:
        staging = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    state.corrected = True  # the layers done so far act corrected; the rest still hold zeros
    with torch.no_grad(), eval_mode(model), _zero3_gathering(model, backward=False):
        hidden, layer_kwargs = _decoder_inputs(model, batches)
        for index, layer in enumerate(_layers(model)):
            WATCHDOG.pet(f"reconstruction: layer {index}")  # a 70B pass outlasts any hang timeout
            tensors: dict[str, Tensor] = {}
            written: dict[str, str] = {"format": FORMAT}  # kind -> the projection's name
            for kind in KINDS:
                linear, columns = linears[kind][index], kept[kind][index]
                if columns.numel() == linear.in_features:  # nothing cut here: Δ stays zero
                    continue
                gram = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float32, device=device)

                def accumulate(module: nn.Module, args: tuple[Tensor, ...]) -> None:
                    flat = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    gram.addmm_(flat.T, flat)

                # Before the mask's own pre-hook: H needs the removed channels' values too.
                handle = linear.register_forward_pre_hook(accumulate, prepend=True)
                try:
                    for h, kwargs in zip(hidden, layer_kwargs):
                        layer(h, **kwargs)
                finally:
                    handle.remove()
                _all_reduce_(gram)
                with gathered([linear.weight]):
                    delta, error = solve(gram, linear.weight.detach(), columns, damping)
                del gram
                errors[kind].append({"layer": index, **error})
                _fill(linear.maskprune_correction, columns, delta)
                name = names[id(linear)]
                tensors[f"{name}.weight"] = delta.to(linear.maskprune_correction.weight.dtype).cpu()
                tensors[f"{name}.columns"] = columns
                written[kind] = name
            if staging is not None:
                save_file(tensors, str(staging / f"layer{index:05d}.safetensors"), metadata=written)
            _advance(layer, hidden, layer_kwargs)
    if staging is not None:
        tokens = sum(int(b.numel()) for b in batches) * _world()  # every rank has as many batches
        (staging / MANIFEST).write_text(json.dumps({
            "format": FORMAT, "layers": len(_layers(model)), "damping": damping,
            "calibration_tokens": tokens, "errors": errors}, indent=1) + "\n")
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    return errors


@dataclass(frozen=True)
class StoredCorrection:
    path: Path      # its layer file
    name: str       # the projection, e.g. model.layers.3.mlp.down_proj
    kind: str       # "attn" (o_proj) or "ffn" (down_proj)
    layer: int

    def read(self) -> tuple[Tensor, Tensor]:
        """(Δ on the kept columns, those columns)."""
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(f"{self.name}.weight"), handle.get_tensor(f"{self.name}.columns")

    def columns(self) -> Tensor:
        """The kept columns alone, without reading Δ (at 70B down_proj, 235 MB a layer)."""
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(f"{self.name}.columns")


def read_corrections(folder: Path) -> list[StoredCorrection]:
    """What a complete reconstruction folder holds, projection by projection."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ReconstructionError(f"{folder}: no {MANIFEST}, so not a complete reconstruction folder; "
                                  f"rerun the mask_learn stage's hardening (it rewrites the folder)")
    found = []
    for layer in range(json.loads(manifest.read_text())["layers"]):
        path = folder / f"layer{layer:05d}.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ReconstructionError(f"{path}: not a maskprune reconstruction file")
        found += [StoredCorrection(path, meta[kind], kind, layer) for kind in KINDS if kind in meta]
    return found


def _check_columns(stored: StoredCorrection, columns: Tensor, kept: dict[str, list[Tensor]], folder: Path) -> None:
    if not torch.equal(columns, kept[stored.kind][stored.layer]):
        raise ReconstructionError(f"{folder}: {stored.name} was reconstructed for other kept channels than "
                                  f"the masks it is used with; use the masks of the same mask_learn run, or "
                                  f"delete the folder so that hardening recomputes it")


def load_corrections(model: nn.Module, state: MaskState, folder: Path) -> None:
    """Fill every Correction from `folder`, refusing one computed for other masks."""
    kept = _kept_columns(state)
    linears = masked_linears(model, state.shape)
    for stored in read_corrections(folder):
        delta, columns = stored.read()
        _check_columns(stored, columns, kept, folder)
        _fill(linears[stored.kind][stored.layer].maskprune_correction, columns, delta)
    state.corrected = True


def kept_columns(keep: KeepIndices, head_dim: int) -> dict[str, list[Tensor]]:
    """Per kind and layer, the input columns of o_proj / down_proj that `keep` keeps."""
    return {"attn": [head_channels(heads, head_dim) for heads in keep.q_heads], "ffn": list(keep.ffn)}


class CorrectedSource:
    """`source` with each corrected weight's kept columns plus its Δ (in float32): the dense model
    whose masked forward is the student mask-learn trained. Refuses Δ for other kept columns."""

    def __init__(self, source: Any, folder: Path, keep: KeepIndices, head_dim: int):
        self.source = source
        self.found = {f"{stored.name}.weight": stored for stored in read_corrections(folder)}
        kept = kept_columns(keep, head_dim)
        names = set(source.names())
        for name, stored in self.found.items():
            if name not in names:
                raise ReconstructionError(f"{folder}: corrects {name}, which the source weights lack; "
                                          f"prune the model mask_learn started from")
            _check_columns(stored, stored.columns(), kept, folder)

    def names(self) -> list[str]:
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(name)

    def get(self, name: str) -> Tensor:
        weight = self.source.get(name)
        stored = self.found.get(name)
        if stored is None:
            return weight
        delta, columns = stored.read()
        out = weight.float().clone()
        out[:, columns] += delta.float()
        return out

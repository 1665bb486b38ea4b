"""This project's ZeRO-3 checkpoints, read one parameter at a time.

Layout (written by the training stages):
    CKPT_ROOT/latest                         the newest complete tag
    CKPT_ROOT/<tag>/zero_pp_rank_*_mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's own
    CKPT_ROOT/<tag>/maskprune_meta.json      stage, step, model_dir, lora, masks, frozen_excluded
    CKPT_ROOT/<tag>/COMPLETE                 written last; a tag without it is refused

Consolidation follows DeepSpeed's `zero_to_fp32` lazy mode (same partition arithmetic, its
`GatheredTensor`), but memory-maps the model-state files too, so neither the fp32 partitions,
the Adam moments nor frozen fragments are read until one parameter asks for its slices.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint.constants import (FP32_FLAT_GROUPS, FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES,
                                            OPTIMIZER_STATE_DICT, PARAM_SHAPES, PARTITION_COUNT, ZERO_STAGE)
from deepspeed.utils.zero_to_fp32 import (GatheredTensor, get_model_state_files, get_optim_files,
                                          zero3_partitioned_param_info)

from maskprune.safe_load import refusal_explained, tensors_only
from maskprune.safetensors_io import SafetensorsDir

META = "maskprune_meta.json"
COMPLETE = "COMPLETE"
STAGES = ("mask_learn", "continued_pretrain")


class CheckpointError(ValueError):
    """A checkpoint that cannot be consolidated; the message names the folder and what to do."""


@dataclass(frozen=True)
class CheckpointMeta:
    stage: str
    step: int
    model_dir: Path
    lora: dict[str, Any] | None   # {"r", "alpha", "targets"}
    masks: Path | None            # KeepIndices at that step
    frozen_excluded: bool
    reconstruction: Path | None = None  # mask_learn's corrections of the kept columns, once hardened


def resolve_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """A tag folder from a checkpoint root (+ tag, default `latest`) or a tag folder itself."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if tag is None and ((path / META).is_file() or any(path.glob("*_model_states.pt"))):
        tag_dir = path
    else:
        latest = path / "latest"
        if tag is None and not latest.is_file():
            raise CheckpointError(f"{path}: neither a checkpoint tag folder nor a root with a `latest` file")
        tag_dir = path / (tag or latest.read_text().strip())
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: no such checkpoint tag")
    if not (tag_dir / COMPLETE).is_file():
        raise CheckpointError(f"{tag_dir}: incomplete checkpoint (no {COMPLETE} marker, the save was "
                              "interrupted); use an earlier tag or the root's `latest`")
    return tag_dir


def read_meta(tag_dir: Path) -> CheckpointMeta:
    path = tag_dir / META
    if not path.is_file():
        raise CheckpointError(f"{tag_dir}: no {META}; not a checkpoint written by a maskprune stage")
    raw = json.loads(path.read_text())
    if raw.get("stage") not in STAGES:
        raise CheckpointError(f"{path}: stage {raw.get('stage')!r} is not one of {STAGES}")
    model_dir = (tag_dir / raw["model_dir"]).resolve()  # absolute paths survive the join unchanged
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{path}: model_dir {model_dir} has no config.json")
    return CheckpointMeta(stage=raw["stage"], step=int(raw["step"]), model_dir=model_dir,
                          lora=raw.get("lora"), masks=tag_dir / raw["masks"] if raw.get("masks") else None,
                          frozen_excluded=bool(raw.get("frozen_excluded", False)),
                          reconstruction=(tag_dir / raw["reconstruction"]).resolve() if raw.get("reconstruction") else None)


def _load_mmap(path: str) -> dict[str, Any]:
    # Tensors-only with DeepSpeed's own objects allowed (maskprune.safe_load.tensors_only); mmap=True
    # leaves every tensor on disk until it is sliced.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


_MADV_DONTNEED = 4


def _drop_pages(tensor: torch.Tensor) -> None:
    """Unmap the file pages a read touched (clean pages of a private file mapping: the kernel
    re-reads them from disk if needed). Otherwise every parameter read leaves its pages counted
    in RSS until the checkpoint is closed, and peak RSS grows to the checkpoint's size."""
    if sys.platform != "linux" or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    aligned = start - start % mmap.PAGESIZE
    length = start + tensor.numel() * tensor.element_size() - aligned
    ctypes.CDLL(None).madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length), _MADV_DONTNEED)


def _file_mappings(tag_dir: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps files of `tag_dir` (from /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().startswith(str(tag_dir)):
                low, high = fields[0].split("-")
                ranges.append((int(low, 16), int(high, 16)))
    return ranges


class ZeroCheckpoint:
    """fp32 master weights of a ZeRO-3 tag, as a WeightSource (names, shape, dtype, get)."""

    def __init__(self, tag_dir: Path, dtype_hint: SafetensorsDir | None = None):
        self.tag_dir = tag_dir
        self._hint = dtype_hint
        tensors_only()
        with refusal_explained(tag_dir):
            model_states = [_load_mmap(f) for f in get_model_state_files(str(tag_dir))]
            optim = [_load_mmap(f)[OPTIMIZER_STATE_DICT] for f in get_optim_files(str(tag_dir))]
        if optim[0].get(ZERO_STAGE) != 3:
            raise CheckpointError(f"{tag_dir}: ZeRO stage {optim[0].get(ZERO_STAGE)}, expected 3")
        world = optim[0][PARTITION_COUNT]
        world = max(world) if isinstance(world, list) else world
        if world != len(optim) or world != len(model_states):
            raise CheckpointError(f"{tag_dir}: {len(optim)} optimizer and {len(model_states)} model files "
                                  f"for {world} ranks; a rank's save is missing")
        groups = [o[FP32_FLAT_GROUPS] for o in optim]
        self._mapped = [flat for rank in groups for flat in rank]  # all memory-mapped (mmap=True)
        bounds = [0]
        for flat in groups[0]:
            bounds.append(bounds[-1] + flat.numel())
        self._params: dict[str, GatheredTensor] = {}
        offset = 0
        for shapes in model_states[0][PARAM_SHAPES]:
            for name, shape in shapes.items():
                numel, _ = zero3_partitioned_param_info(shape.numel(), world)
                self._params[name] = GatheredTensor(groups, bounds, offset, numel, shape)
                offset += numel
        if offset != bounds[-1]:
            raise CheckpointError(f"{tag_dir}: a rank's partitions hold {bounds[-1]} values, the "
                                  f"parameters need {offset}; the checkpoint is inconsistent")
        frozen = model_states[0].get(FROZEN_PARAM_SHAPES) or {}
        self._frozen = {name: (shape, [m[FROZEN_PARAM_FRAGMENTS][name] for m in model_states])
                        for name, shape in frozen.items()}
        self._mapped += [f for _, fragments in self._frozen.values() for f in fragments]
        # Only pages of the checkpoint files may be dropped: on anonymous memory madvise would
        # zero the data instead.
        files = _file_mappings(tag_dir.resolve()) if sys.platform == "linux" else []
        self._mapped = [t for t in self._mapped
                        if any(low <= t.data_ptr() < high for low, high in files)]
        self._alias = dict(model_states[0].get("shared_params") or {})

    def names(self) -> list[str]:
        return [*self._params, *self._frozen, *self._alias]

    def shape(self, name: str) -> tuple[int, ...]:
        name = self._alias.get(name, name)
        return tuple(self._params[name].shape if name in self._params else self._frozen[name][0])

    def dtype(self, name: str) -> torch.dtype:
        """The dtype the model directory stores this weight in (fp32 if it does not have it)."""
        if self._hint is not None and name in self._hint.names():
            return self._hint.dtype(name)
        return torch.float32

    def get(self, name: str) -> torch.Tensor:
        name = self._alias.get(name, name)
        if name in self._params:
            value = self._params[name].contiguous().clone()  # clone: drop the padded concat buffer
        else:
            shape, fragments = self._frozen[name]
            value = torch.cat([f.reshape(-1) for f in fragments])[:shape.numel()].view(shape).clone()
        for mapped in self._mapped:  # the copy is ours now; the mapped pages can go
            _drop_pages(mapped)
        return value

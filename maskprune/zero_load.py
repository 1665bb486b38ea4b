"""Load a safetensors checkpoint straight into ZeRO-3 partitions, one tensor slice at a time.

HF's `from_pretrained` under ZeRO-3 reads whole shards into every rank's memory before
partitioning: 8 ranks of a node each held the full 140 GB of a 70B. Here the model is built
empty under `deepspeed.zero.Init` (no weight init: every weight is overwritten), and each rank
copies from the memory-mapped file only the elements of its own partition into `param.ds_tensor`.
No collective, no full tensor, 1/world_size of the bytes read per rank; mapped file pages are
page cache, not the process's anonymous memory.

ZeRO-3 partition layout (deepspeed/runtime/zero/partition_parameters.py, `_partition_param`):
the flattened parameter, padded to world_size x partition numel, rank r holding elements
[r * p, (r + 1) * p), p = `param.ds_tensor.ds_numel`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from maskprune.dist import log
from maskprune.export import IGNORED_SUFFIXES
from maskprune.safetensors_io import SafetensorsDir, WeightFileError
from maskprune.watchdog import WATCHDOG

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors are not the model's parameters; the message names them."""


def build_partitioned_model(model_dir: Path, ds: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """An empty causal LM of `model_dir`'s config, partitioned as it is built. Weight init is
    skipped (HF's ZeRO-3 init gathers every module to rank 0 to fill it, a full pass over a 70B
    that is then overwritten); buffers (rotary inv_freq) are computed by the modules' constructors
    as in `from_config`."""
    import deepspeed
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import local_torch_dtype

    started = time.perf_counter()
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    config.dtype = dtype
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # The contexts of transformers' own `_from_config` under ZeRO-3, minus its weight init.
    with local_torch_dtype(dtype, model_class.__name__), no_init_weights(), prevent_arange_dtype_change(), \
            _init_without_broadcast(deepspeed)(config_dict_or_path=ds):
        model = model_class(config)
    model.tie_weights()  # no_init_weights skips the tying that post_init would do
    model.eval()  # as from_pretrained returns it; training stages switch to train mode themselves
    log(f"built {model_class.__name__} partitioned over ranks in {time.perf_counter() - started:.1f} s")
    return model


def _init_without_broadcast(deepspeed: Any) -> type:
    """zero.Init that skips its per-parameter broadcast from rank 0: that broadcast makes ranks
    agree on random init values, which the load overwrites element by element. It costs a full pass
    of the model through the network, and on CPU ranks its buffers held another 0.8 GB of RssAnon
    on two of four ranks loading a 1.7 GB model."""

    class InitWithoutBroadcast(deepspeed.zero.Init):
        def _zero_init_param(self, param: torch.nn.Parameter) -> None:
            self._convert_to_deepspeed_param(param)
            param.partition()

    return InitWithoutBroadcast


def load_into_partitions(model: torch.nn.Module, weights: SafetensorsDir) -> None:
    """Copy every parameter's own partition from the safetensors files, shard by shard. Checks
    names and shapes of the whole checkpoint before reading any data."""
    plan = _match(model, weights)
    shards = weights.shards()
    for number, (path, keys) in enumerate(shards.items(), start=1):
        wanted = [key for key in keys if key in plan]
        with safe_open(str(path), framework="pt") as handle:  # memory-mapped; pages are page cache
            for key in wanted:
                try:
                    _copy_own_slice(handle.get_slice(key), plan[key])
                except Exception as err:  # safetensors raises its own error type on bad data
                    raise WeightFileError(f"{path}: cannot read tensor {key} ({err})") from None
                WATCHDOG.pet()  # a 70B's load takes longer than any hang timeout; each tensor is progress
        log(f"loaded shard {number}/{len(shards)} {path.name}: {len(wanted)} tensors into ZeRO-3 partitions")


def open_checkpoint(model_dir: Path) -> SafetensorsDir:
    """The safetensors weights of `model_dir`, headers checked; pickle weights are refused."""
    if not any(model_dir.glob("*.safetensors")):
        pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise WeightFileError(
                f"{model_dir}: weights only in pickle files ({', '.join(pickled)}), which maskprune never "
                "loads (unpickling runs code); convert them once to safetensors on a trusted machine "
                "(model.save_pretrained(dir, safe_serialization=True))")
    return SafetensorsDir(model_dir)


def _match(model: torch.nn.Module, weights: SafetensorsDir) -> dict[str, torch.nn.Parameter]:
    """Checkpoint key -> the parameter it fills. A tied parameter (lm_head = embed_tokens) has
    several names; the checkpoint must hold at least one of them and fills it once."""
    aliases: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
        params[id(param)] = param
    present = set(weights.names())
    plan: dict[str, torch.nn.Parameter] = {}
    missing, wrong_shape = [], []
    for key, names in aliases.items():
        found = [name for name in names if name in present]
        if not found:
            missing.append(" = ".join(names))
            continue
        param = params[key]
        shape = tuple(param.ds_shape)
        if weights.shape(found[0]) != shape:
            wrong_shape.append(f"{found[0]} {weights.shape(found[0])} (model: {shape})")
        plan[found[0]] = param
    known = {name for names in aliases.values() for name in names}
    unexpected = sorted(k for k in present - known if not k.endswith(IGNORED_SUFFIXES))
    problems = [f"{label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''} ({len(items)})"
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", wrong_shape)) if items]
    if problems:
        raise CheckpointMismatchError(
            f"{weights.folder}: checkpoint does not match its config.json ({'; '.join(problems)}); "
            "the folder must be a Hugging Face checkpoint saved with its own config")
    return plan


def _copy_own_slice(source: Any, param: torch.nn.Parameter) -> None:
    """Fill this rank's partition of `param` from `source` (a safetensors slice handle), reading
    only the whole rows of dim 0 that cover the partition's flat range."""
    from deepspeed import comm

    partition = param.ds_tensor
    if getattr(param, "ds_secondary_tensor", None) is not None:
        raise ValueError("zero_optimization.zero_hpz_partition_size > 1 is not supported by the streaming "
                         "loader; set it to 1")
    if getattr(partition, "final_location", None) is not None:
        raise ValueError("zero_optimization.offload_param.device = 'nvme' is not supported by the streaming "
                         "loader; use 'cpu' or 'none'")
    size = partition.ds_numel
    start = size * comm.get_rank(group=param.ds_process_group)
    count = max(0, min(size, param.ds_numel - start))
    target = partition.data.view(-1)
    if count:
        shape = source.get_shape()
        row = 1
        for dim in shape[1:]:
            row *= dim
        first, last = start // row, -(-(start + count) // row)
        rows = source[first:last] if shape else source[:]
        flat = rows.reshape(-1)[start - first * row:start - first * row + count]
        target[:count].copy_(flat)  # converts the file's dtype to the model's
    target[count:].zero_()  # padding of the last partition

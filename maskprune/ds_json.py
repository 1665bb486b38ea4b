"""A training stage's DeepSpeed JSON, frozen into its stage folder when the stage starts.

    RUN/<stage>/ds_config.json    `<stage>.ds_config` as it read when the stage started

Every rank reads this copy, never the configured path, so a stage resumed after a preemption trains
under the settings its checkpoints were written with, whichever directory it is started from and
whatever happened to a shared ds_configs/ since. A relative `ds_config` is looked up in the current
directory, then in the maskprune source tree (its ds_configs/). On a resume the configured file is
read again and compared with the copy:
- keys that decide where tensors live and how they move (offload, buckets, prefetch, activation
  checkpointing, logging) may change: a job requeued onto smaller GPUs can turn on offload;
- any other change (precision, optimizer, scheduler, ZeRO++ quantisation) is refused, each key named,
  before a rank starts: the optimizer state and loss scale being restored belong to the old settings.
  `--force` starts the stage over with the new file;
- a file no longer found (another working directory, a cleaned checkout) resumes from the copy.
A finished stage is not re-run because its file changed since; its copy records what it ran with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskprune.config import flatten

FROZEN_NAME = "ds_config.json"
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # a source checkout's root, where ds_configs/ lies

# Written from the experiment file whatever the JSON says (training.load_ds_config): never compared.
FROM_EXPERIMENT = frozenset({"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                             "gradient_clipping", "optimizer.params.lr", "optimizer.params.weight_decay"})
# Where tensors live and how they move, not what is computed: a resume may change these...
PLACEMENT = ("zero_optimization.", "activation_checkpointing.", "aio.", "comms_logger.", "flops_profiler.",
             "tensorboard.", "csv_monitor.", "wandb.", "wall_clock_breakdown", "steps_per_print",
             "memory_breakdown", "dump_state")
# ...except these, which change the numbers: the partitioning itself and ZeRO++'s quantised transfers.
NOT_PLACEMENT = frozenset({"zero_optimization.stage", "zero_optimization.zero_quantized_weights",
                           "zero_optimization.zero_quantized_gradients",
                           "zero_optimization.zero_quantized_nontrainable_weights"})

_ABSENT = object()


class DsConfigError(ValueError):
    """A ds_config that cannot be used as asked; the message names the file and the fix."""


class DsConfigMissing(DsConfigError):
    """The configured file is nowhere it is looked for."""


def frozen_path(stage_dir: Path) -> Path:
    return Path(stage_dir) / FROZEN_NAME


def resolve(path: str | Path) -> Path:
    """The configured file: an absolute path as it is, a relative one in the current directory or,
    failing that, in the maskprune source tree (`maskprune run` from outside the checkout)."""
    path = Path(path)
    folders = [Path("/")] if path.is_absolute() else list(dict.fromkeys([Path.cwd(), SOURCE_ROOT]))
    for folder in folders:
        if (folder / path).is_file():
            return folder / path
    where = "" if path.is_absolute() else f" (looked in {' and '.join(map(str, folders))})"
    raise DsConfigMissing(f"ds_config {path}: not found{where}; use one of ds_configs/*.json")


def read(path: Path) -> dict[str, Any]:
    """A DeepSpeed JSON maskprune can train with: ZeRO-3, concrete numbers."""
    try:
        ds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise DsConfigError(f"ds_config {path}: not valid JSON ({err})") from None
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise DsConfigError(f"ds_config {path}: zero_optimization.stage must be 3 (got {zero.get('stage')}); "
                            "maskprune partitions every model with ZeRO-3")
    autos = [k for k, v in flatten(ds).items() if v == "auto"]
    if autos:
        raise DsConfigError(f"ds_config {path}: 'auto' values ({', '.join(autos)}) need the HF Trainer; "
                            "give concrete numbers")
    return ds


def is_placement(key: str) -> bool:
    return key.startswith(PLACEMENT) and key not in NOT_PLACEMENT  # not "stage" in "stage3_prefetch_..."


def differences(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(what changes the training, where tensors live): each differing key as `key: old -> new`."""
    before, after = flatten(old), flatten(new)
    training: list[str] = []
    placement: list[str] = []
    for key in sorted(set(before) | set(after)):
        if key in FROM_EXPERIMENT or before.get(key, _ABSENT) == after.get(key, _ABSENT):
            continue
        shown = [json.dumps(side[key]) if key in side else "(absent)" for side in (before, after)]
        (placement if is_placement(key) else training).append(f"{key}: {shown[0]} -> {shown[1]}")
    return training, placement


@dataclass
class Settled:
    """What a training stage starting or resuming in its folder trains with."""
    ds: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # for the log: what the resume took from where
    refusal: str = ""  # set when the configured file changes what the checkpoints were trained under


def settle(stage: str, stage_dir: Path, configured: str) -> Settled:
    """The JSON for `stage`: the configured file on a fresh start; on a resume (a frozen copy in
    `stage_dir`) the copy, updated by placement changes, refused on any other."""
    copy = frozen_path(stage_dir)
    if not copy.is_file():
        return Settled(read(resolve(configured)))
    frozen = json.loads(copy.read_text())
    try:
        current = read(resolve(configured))
    except DsConfigMissing as err:
        return Settled(frozen, [f"{stage}: {err}; resuming with the copy frozen when the stage started, {copy}"])
    training, placement = differences(frozen, current)
    if training:
        return Settled(frozen, refusal=(
            f"ds_config {configured} changed since the stage started ({'; '.join(training)}); its checkpoints "
            f"were trained under the copy in {copy}: restore the file, or pass --force to start {stage} over "
            "with the new one"))
    if placement:
        return Settled(current, [f"{stage}: resuming with the ds_config's new placement ({'; '.join(placement)})"])
    return Settled(current)

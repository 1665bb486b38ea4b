"""Tensors-only unpickling for every checkpoint file a maskprune process reads, DeepSpeed's included.

DeepSpeed reads its own checkpoint files with `torch.load(weights_only=False)` (its checkpoint
engine on resume, the ZeRO-3 universal loader, `ds_to_universal`), which runs whatever callable a
pickle names: a planted or swapped `.pt` in a shared run directory would run code on every rank that
resumes from it, or in whoever exports it. torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides each
call's own `weights_only`, so once `tensors_only()` has run, those loads are tensors-only too. The
only objects besides tensors and plain containers that a ZeRO checkpoint holds, DeepSpeed's ZeRO
stage enum and loss scalers, are allowed by name: fp32 ZeRO-3 checkpoints and their universal form
go through these loads in the resume and export tests; bf16 ones (ds_configs/zero3_gpu_bf16.json)
and their universal form hold nothing else either (torch's get_unsafe_globals_in_checkpoint,
DeepSpeed 0.19.8).
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that names a callable no DeepSpeed checkpoint holds; it was not run."""


def tensors_only() -> None:
    """From here on, every torch.load in this process, and in the processes it starts (the env var;
    forked workers also inherit the allowed names), unpickles tensors and the allowed objects only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    os.environ[FORCE_ENV] = "1"
    torch.serialization.add_safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler])


@contextmanager
def refusal_explained(checkpoint: Path) -> Iterator[None]:
    """torch's refusal of a non-allowed object, as one line naming the checkpoint and what to do."""
    try:
        yield
    except pickle.UnpicklingError as err:
        # torch words it "Unsupported global: GLOBAL x.y ..." or "unsupported GLOBAL x.y whose module ..."
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise UnsafeCheckpointError(
            f"{checkpoint}: a file in it names {found.group(1) if found else 'an object'}, which no DeepSpeed "
            "checkpoint holds; it was not loaded (maskprune unpickles checkpoints tensors-only, so such "
            "a file cannot run code). Delete this checkpoint folder (resume then takes the one before "
            "it) and check who can write to the run directory"
        ) from None

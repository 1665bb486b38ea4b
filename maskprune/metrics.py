"""Rank-0 TensorBoard metrics with namespaced tags (loss/, sparsity/, dual/, throughput/, memory/).

DeepSpeed 0.19.8 no longer writes the training loss itself, so every stage logs through this.
Writers on other ranks are no-ops, so call sites need no rank checks.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import psutil
import torch

from maskprune.dist import rank


class MetricWriter:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        self._writer = None
        if rank() == 0:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events past a resumed step, so curves continue instead of overlapping.
            self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer:
            self._writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def histogram(self, tag: str, values: torch.Tensor | np.ndarray, step: int) -> None:
        if self._writer:
            self._writer.add_histogram(tag, values, step)

    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        if self._writer:
            self._writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def flush(self) -> None:
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()


def memory_metrics() -> dict[str, float]:
    """memory/ tags: this process's RSS, and the accelerator's peak where there is one."""
    values = {"memory/rss_gib": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        values["memory/gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return values

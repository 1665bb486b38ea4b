"""benchmarks/memory_trace.py: the peak breakdown bench_gpu prints is the memory profiler's timeline
replayed to its highest point — the right moment, the right live set, each block under its category
and size. Checked on a timeline written by hand, and on a real CPU step whose tensors are known."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from memory_trace import UNKNOWN, format_breakdown, peak_breakdown, profile_peak  # noqa: E402

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Key:  # the fields of torch's TensorKey that the replay reads
    id: int
    device: torch.device = CPU


@dataclass(frozen=True)
class UntrackedKey:  # torch's bare Key: an allocation with no tensor
    device: torch.device = CPU


def event(action: str, key_, size: int, version: int = 0) -> tuple:
    return (0, SimpleNamespace(name=action), (key_, version), size)


def test_the_live_set_is_taken_at_the_highest_point():
    a, b, c, d = Key(1), Key(2), Key(3), Key(4)
    timeline = [event("PREEXISTING", a, 100),
                event("CREATE", b, 50), event("DESTROY", b, 50),
                event("CREATE", c, 30), event("INCREMENT_VERSION", c, 30),   # an activation becomes a gradient
                event("CREATE", UntrackedKey(), 7),
                event("CREATE", d, 30),                                     # 167: the peak
                event("CREATE", Key(5, torch.device("meta")), 1000),        # another device: not counted
                event("DESTROY", d, 30), event("CREATE", Key(6), 20)]       # 157
    categories = {(1, 0): "parameter", (3, 1): "gradient", (4, 0): "activation"}
    peak, groups = peak_breakdown(timeline, lambda k, v: categories.get((k.id, v), UNKNOWN), CPU)
    assert peak == 167
    assert groups == {("parameter", 100): 100, ("gradient", 30): 30, ("activation", 30): 30, (UNKNOWN, 0): 7}
    text = format_breakdown(peak, groups, top=2).splitlines()
    assert text[0].startswith("  peak 0.00 GiB: parameter 0.00, gradient 0.00")
    assert text[1].split()[-5:] == ["parameter", "1", "x", "0.00", "MiB"] and len(text) == 3


def test_a_real_step_shows_its_activations_at_the_peak():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 1024)
    inputs = torch.randn(1024, 64, requires_grad=True)

    def step() -> None:
        torch.nn.functional.gelu(linear(inputs)).square().sum().backward()

    lines = profile_peak(step, CPU).splitlines()
    # the linear's output (saved by GELU) and GELU's (saved by square): [1024, 1024] fp32, 4 MiB each
    assert lines[0].startswith("  peak 0.02 GiB: activation 0.01")
    assert lines[1].split() == ["8.0", "MiB", "activation", "2", "x", "4.00", "MiB"]

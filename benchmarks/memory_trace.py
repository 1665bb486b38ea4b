"""What is live at a training step's memory peak, by kind (torch's memory profiler categories) and size.

`bench_gpu.py --memory-breakdown` profiles one more step of each phase and prints, at the highest
point of the profiled device's memory: bytes per category (parameter, optimizer state, gradient,
activation, temporary, autograd detail, unknown) and the largest groups of equal-sized blocks per
category. Sizes name the tensors in a known shape: at micro-batch B, sequence T, hidden H, FFN F and
vocabulary V in bf16, B·T·H·2 bytes is a hidden state, B·T·F·2 an MLP activation, B·T·V·4 an fp32
logits copy. The planner's items are checked against such a breakdown (benchmarks/README), not only
against the peak's total.

(CUDA's allocator history, `torch.cuda.memory._record_memory_history(stacks="python")`, would name
the allocating lines, but with torch 2.11 on an H200 it made backward fail with "SystemError: error
return without exception set" inside the chunked losses' recomputation.)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

UNKNOWN = "unknown"


def peak_breakdown(timeline: Iterable[tuple], category_of: Callable[[object, int], str],
                   device: torch.device) -> tuple[int, dict[tuple[str, int], int]]:
    """Replay a memory profile's timeline for `device`: the peak bytes and {(category, block size): bytes}
    live at it. Allocations the profiler could not tie to a tensor share one key, so they are one
    running total (category "unknown", block size 0)."""
    events = [event for event in timeline if event[2][0].device == device]

    def replay(stop: int) -> tuple[int, int, dict]:
        live: dict[object, list] = {}
        total = untracked = peak = 0
        peak_index = -1
        for index, (_, action, (key, version), size) in enumerate(events[:stop]):
            name = action.name
            tracked = hasattr(key, "id")  # TensorKey; a bare Key is an allocation with no tensor
            if name in ("PREEXISTING", "CREATE"):
                total += size
                if tracked:
                    live[key] = [size, version]
                else:
                    untracked += size
            elif name == "INCREMENT_VERSION" and tracked and key in live:
                live[key][1] = version + 1
            elif name == "DESTROY":
                total -= size
                if tracked:
                    live.pop(key, None)
                else:
                    untracked -= size
            if total > peak:
                peak, peak_index = total, index
        return peak, peak_index, {"live": live, "untracked": untracked}

    peak, peak_index, _ = replay(len(events))
    _, _, state = replay(peak_index + 1)
    groups: dict[tuple[str, int], int] = {}
    for key, (size, version) in state["live"].items():
        group = (category_of(key, version), size)
        groups[group] = groups.get(group, 0) + size
    if state["untracked"]:
        groups[(UNKNOWN, 0)] = state["untracked"]
    return peak, groups


def format_breakdown(peak: int, groups: dict[tuple[str, int], int], top: int) -> str:
    mib = 2 ** 20
    by_category: dict[str, int] = {}
    for (category, _), bytes_ in groups.items():
        by_category[category] = by_category.get(category, 0) + bytes_
    lines = [f"  peak {peak / 2 ** 30:.2f} GiB: " + ", ".join(
        f"{category} {bytes_ / 2 ** 30:.2f}" for category, bytes_ in sorted(by_category.items(), key=lambda c: -c[1]))]
    rows = sorted(groups.items(), key=lambda item: (-item[1], item[0]))[:top]  # ties: by name, then size
    lines += [f"  {bytes_ / mib:10.1f} MiB  {category:16s} " +
              (f"{bytes_ // size} x {size / mib:.2f} MiB" if size else "(no tensor)")
              for (category, size), bytes_ in rows]
    return "\n".join(lines)


def profile_peak(step: Callable[[], None], device: torch.device, top: int = 15) -> str:
    """Run `step` once under torch's memory profiler; the breakdown of `device`'s peak."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import TensorKey

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    # what the profiler saw against the allocator's own count: blocks the step never touched are missing
    allocator = (f"  allocator: {before / 2 ** 30:.2f} GiB before the step, peak "
                 f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f}\n") if cuda else ""
    memory = prof._memory_profile()

    def category_of(key, version: int) -> str:
        category = memory._categories.get(key, version) if isinstance(key, TensorKey) else None
        return category.name.lower() if category else UNKNOWN

    return allocator + format_breakdown(*peak_breakdown(memory.timeline, category_of, device), top)

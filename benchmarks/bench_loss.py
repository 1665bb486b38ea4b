"""The chunked loss path against one whole-batch pass: time and peak memory side by side.

    .venv/bin/python benchmarks/bench_loss.py [--tokens 4096 --vocab 49152 --hidden 576 --repeats 5]

One LM head (bf16 weights on a GPU, fp32 on CPU) over random hidden states, then `lm_losses`
(CE + KL to a teacher's logits at temperature 2, as mask-learn runs it, or CE alone with --ce-only)
and backward, once with `LOSS_CHUNK_TOKENS` as set (chunked) and once with it above the token count
(one chunk: no saving, the recomputation still paid). Printed per variant: median seconds of
forward + backward, and the peak bytes allocated above the inputs (CUDA's allocator, or torch's
memory profiler on CPU) in B·T·V fp32 copies. On CPU the times are rough; the ratio is the figure.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import maskprune.losses as losses  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="B·T of one micro-batch")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ce-only", action="store_true", help="no teacher (continued pretraining)")
    return parser.parse_args()


def step(head: torch.nn.Linear, states: torch.Tensor, labels: torch.Tensor,
         teacher: torch.Tensor | None) -> None:
    ce, kl = losses.lm_losses(head(states), labels, teacher, 2.0)
    (ce if kl is None else ce + kl).backward()


def peak_copies(run, unit: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / unit
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak / unit


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype)
    states = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, args.vocab, (1, args.tokens), device=device)
    teacher = None if args.ce_only else head(torch.randn_like(states)).detach()
    unit = args.tokens * args.vocab * 4
    chunk = losses.LOSS_CHUNK_TOKENS
    rows = {}
    for name, chunk_tokens in (("one chunk", args.tokens + 1), (f"chunks of {chunk}", chunk)):
        losses.LOSS_CHUNK_TOKENS = chunk_tokens
        run = lambda: step(head, states, labels, teacher)  # noqa: E731
        run()  # warm-up
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        rows[name] = (statistics.median(times), peak_copies(run, unit, device))
    print(f"{device.type}, {args.tokens} tokens x vocab {args.vocab}, {'CE' if args.ce_only else 'CE + KL (T=2)'}")
    for name, (seconds, copies) in rows.items():
        print(f"  {name:16s} {seconds * 1e3:8.1f} ms  peak {copies:5.2f} fp32 B·T·V copies")
    (whole_s, whole_c), (chunked_s, chunked_c) = rows.values()
    print(f"  chunked / one chunk: time {chunked_s / whole_s:.2f}x, peak memory {chunked_c / whole_c:.2f}x")


if __name__ == "__main__":
    main()

"""Held-out and dev windows that share a run of tokens with the training text.

    from maskprune.overlap import windows_in_training
    shared = windows_in_training({"sotu:heldout": windows}, TokenShards(run / "tokenize", "train"))
    shared["sotu:heldout"]          # how many of its [n, L] windows hold a 32-token run of training text

A held-out figure means something only if no stage saw the text. The named corpora are split so that
none does (tests/test_heldout.py), but a user's corpus is not: web crawls and book collections hold
Shakespeare, State of the Union speeches and project docs. So the stages check the windows they
score against the training split itself, on token ids (the tokenize stage's tokenizer cut both):
a window counts when any NGRAM consecutive tokens of it occur anywhere in the training stream.
NGRAM = 32 tokens (about 24 words) is longer than a common phrase or a short quotation and shorter
than any scored window.

Each n-gram is one 64-bit hash (every token id mixed by splitmix64, then combined by doubling:
h_2k[i] = h_k[i] * C_k + h_k[i + k]), so the training stream is read once, in chunks, with numpy;
a hash coincidence has odds of about 1e-19 per pair. With several ranks each reads its own slice of
the stream (overlapping the next by NGRAM - 1 tokens, so no run at a boundary is missed) and the
counts are combined: a 3B-token corpus costs each of 64 ranks about 50M tokens.
"""
from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

import numpy as np
import torch

from maskprune.watchdog import WATCHDOG

NGRAM = 32
CHUNK_TOKENS = 1 << 24  # 16M tokens of the training stream at a time: ~0.5 GB of work arrays
_PREFILTER_SHIFT = np.uint64(40)  # a 16 MB table of the probes' top 24 bits
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
# Odd multipliers for the doubling steps (k = 1, 2, 4, ...): each step weighs its left half differently.
_COMBINE = tuple(np.uint64(c) for c in (0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB,
                                        0x8EBC6AF09C88C6E3, 0x589965CC75374CC3, 0x1D8E4E27C47D124F))


class TokenStream(Protocol):
    stream_tokens: int

    def stream_slice(self, begin: int, end: int) -> np.ndarray: ...


def ngram_hashes(tokens: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """One uint64 per n-gram of `tokens` (len - n + 1 of them; none when shorter than n)."""
    if n & (n - 1) or n > 1 << len(_COMBINE):
        raise ValueError(f"n-gram length {n}: must be a power of two up to {1 << len(_COMBINE)}")
    with np.errstate(over="ignore"):
        h = np.asarray(tokens, dtype=np.uint64) * _MIX[0]
        h = (h ^ (h >> np.uint64(30))) * _MIX[1]
        h = (h ^ (h >> np.uint64(27))) * _MIX[2]
        h ^= h >> np.uint64(31)
        k = 1
        for step in range(n.bit_length() - 1):
            h = h[:-k] * _COMBINE[step] + h[k:]
            k *= 2
    return h


def windows_in_training(windows: dict[Hashable, torch.Tensor], train: TokenStream, rank: int = 0,
                        world_size: int = 1, device: torch.device | None = None,
                        chunk_tokens: int = CHUNK_TOKENS) -> dict[Hashable, int]:
    """For each key, how many of its windows ([n, L] token ids) share an NGRAM-token run with the
    training stream. With world_size > 1 every rank calls this with its rank and gets the same counts."""
    labels, rows = list(windows), [w.reshape(len(w), -1).numpy() for w in windows.values()]
    owner = [ngram_hashes(row) for rows_of in rows for row in rows_of]  # per window, its n-grams
    probes = np.unique(np.concatenate(owner)) if owner else np.zeros(0, np.uint64)
    found = np.zeros(len(probes), dtype=bool)
    prefilter = np.zeros(1 << (64 - int(_PREFILTER_SHIFT)), dtype=bool)  # the probes' top bits
    prefilter[probes >> _PREFILTER_SHIFT] = True
    per_rank = -(-train.stream_tokens // world_size)
    begin, end = rank * per_rank, min((rank + 1) * per_rank, train.stream_tokens)
    while probes.size and begin < end:
        stop = min(begin + chunk_tokens, end)
        hashes = ngram_hashes(train.stream_slice(begin, stop + NGRAM - 1))  # runs that start before `stop`
        hashes = hashes[prefilter[hashes >> _PREFILTER_SHIFT]]  # a lookup per hash, a search for few
        at = np.searchsorted(probes, hashes).clip(max=len(probes) - 1)
        found[at[probes[at] == hashes]] = True
        begin = stop
        WATCHDOG.pet("overlap scan")
    found_t = torch.from_numpy(found).to(device or "cpu", torch.int32)
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(found_t, op=torch.distributed.ReduceOp.MAX)
    seen = probes[found_t.cpu().numpy() > 0]
    hashes_of = iter(owner)
    return {label: sum(bool(np.isin(next(hashes_of), seen).any()) for _ in rows_of)
            for label, rows_of in zip(labels, rows)}

"""maskprune.overlap: held-out windows that share a run of NGRAM tokens with the training stream."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from maskprune.overlap import NGRAM, ngram_hashes, windows_in_training


class Stream:
    """A training split's token stream, as TokenShards serves it."""

    def __init__(self, tokens: np.ndarray):
        self.tokens, self.stream_tokens = tokens, len(tokens)

    def stream_slice(self, begin: int, end: int) -> np.ndarray:
        return self.tokens[begin:end].astype(np.int64)


def unseen(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(50_000, 60_000, n)  # ids the training streams below never use


def test_equal_runs_hash_equal_and_order_matters() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, 200)
    hashes = ngram_hashes(tokens)
    assert hashes.dtype == np.uint64 and hashes.shape == (200 - NGRAM + 1,)
    assert ngram_hashes(tokens[10:10 + NGRAM]).tolist() == [hashes[10]]
    swapped = tokens[10:10 + NGRAM].copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert swapped.tolist() != tokens[10:10 + NGRAM].tolist() and ngram_hashes(swapped)[0] != hashes[10]
    assert len(np.unique(hashes)) == len(hashes)
    assert ngram_hashes(tokens[:NGRAM - 1]).size == 0
    with pytest.raises(ValueError, match="n-gram length 24: must be a power of two"):
        ngram_hashes(tokens, 24)


def test_a_window_counts_from_a_whole_run_of_training_tokens_not_one_shorter() -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 50_000, 10_000)
    whole, shorter, clean = unseen(rng, 128), unseen(rng, 128), unseen(rng, 128)
    whole[40:40 + NGRAM] = train[5000:5000 + NGRAM]
    shorter[40:40 + NGRAM - 1] = train[5000:5000 + NGRAM - 1]
    windows = {"text": torch.from_numpy(np.stack([whole, shorter, clean, whole])),
               ("other", "128"): torch.from_numpy(clean[None])}
    assert windows_in_training(windows, Stream(train)) == {"text": 2, ("other", "128"): 0}


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_run_is_found_by_some_rank_wherever_slices_and_chunks_end(world_size: int) -> None:
    """Runs start every 7 tokens, so some cross each rank's and each 33-token chunk's end; the ranks
    together (the all-reduce's MAX) find every one, none twice-counted, each rank alone only its own."""
    rng = np.random.default_rng(2)
    train = rng.integers(0, 50_000, 1000)
    windows = {start: torch.from_numpy(np.concatenate([unseen(rng, 20), train[start:start + NGRAM],
                                                       unseen(rng, 20)]))[None]
               for start in range(0, len(train) - NGRAM + 1, 7)}
    found = dict.fromkeys(windows, 0)
    for rank in range(world_size):
        mine = windows_in_training(windows, Stream(train), rank, world_size, chunk_tokens=33)
        per_rank = -(-len(train) // world_size)
        assert mine == {start: int(rank * per_rank <= start < (rank + 1) * per_rank) for start in windows}
        found = {start: max(found[start], mine[start]) for start in windows}
    assert found == dict.fromkeys(windows, 1)


def _scan_on_rank(rank: int, train: np.ndarray, windows: dict, out: Path) -> None:
    # A file store: no port to pick, so nothing another process can take first.
    torch.distributed.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2)
    counts = windows_in_training(windows, Stream(train), rank, 2)
    (out / f"{rank}.json").write_text(json.dumps(counts))
    torch.distributed.destroy_process_group()


def test_two_ranks_each_reading_half_agree_on_the_whole_count(tmp_path: Path) -> None:
    """Two gloo ranks, as a training stage calls it: runs in either half (and across the middle)
    are counted by both ranks."""
    rng = np.random.default_rng(3)
    train = rng.integers(0, 50_000, 2000)
    texts = np.stack([unseen(rng, 128) for _ in range(4)])
    for row, start in zip(texts, (100, 990, 1500)):  # first half, across the middle, second half
        row[50:50 + NGRAM] = train[start:start + NGRAM]
    windows = {"a": torch.from_numpy(texts[:2]), "b": torch.from_numpy(texts[2:])}
    torch.multiprocessing.spawn(_scan_on_rank, args=(train, windows, tmp_path), nprocs=2)
    assert [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)] == [{"a": 2, "b": 1}] * 2

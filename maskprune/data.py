"""Reading the tokenize stage's shards in training: packed sequences, per-rank batches, exact resume.

    ds = TokenShards(run_dir / "tokenize", "train")
    it = BatchIterator(ds, micro_batch_size=4, rank=rank, world_size=world, seed=0)
    batch = next(it)                      # LongTensor [4, seq_len]; labels = inputs
    ckpt["data"] = it.state_dict()        # ... later: it.load_state_dict(ckpt["data"])

The iterator walks one global sample stream: position p is sample `perm(seed, p // N)[p % N]` of the
split's N sequences, a fresh permutation per epoch. Every `next` consumes micro × world positions,
rank r taking its own contiguous micro-slice, so the saved state is one global count. A checkpoint
therefore resumes on any world size whose micro × world divides that count, with no sample repeated
or skipped.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from maskprune.shard_writer import INDEX_FORMAT


class DataStateError(ValueError):
    """A loader state that cannot be resumed as asked; the message says why and what to do."""


class TokenShards:
    """One split of a tokenized dataset as fixed-length sequences, read through memmaps."""

    def __init__(self, data_dir: str | Path, split: str):
        self.data_dir = Path(data_dir)
        index_path = self.data_dir / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: no tokenized dataset; run the tokenize stage first")
        index = json.loads(index_path.read_text())
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {INDEX_FORMAT!r}; "
                             "re-run the tokenize stage")
        if split not in index["splits"]:
            raise ValueError(f"{index_path}: no split {split!r}; splits: {', '.join(index['splits'])}")
        self.split = split
        self.seq_len: int = index["seq_len"]
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        # For a model trained with BOS opening every sequence (Gemma): each sequence is BOS and the
        # next seq_len - 1 tokens of the stream.
        self.bos_first: int | None = index.get("bos_first")
        self._stride = self.seq_len - (self.bos_first is not None)
        info = index["splits"][split]
        self.num_tokens: int = info["tokens"]
        self._num_sequences: int = info["sequences"]
        self._shards = [np.memmap(self.data_dir / s["file"], dtype=index["dtype"], mode="r")
                        for s in index["shards"]]
        self._segments = np.asarray(info["segments"], dtype=np.int64).reshape(-1, 3)
        # Start of each segment in the split's token stream, for the binary search in __getitem__.
        self._starts = np.concatenate([[0], np.cumsum(self._segments[:, 2] - self._segments[:, 1])])

    def __len__(self) -> int:
        return self._num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence i, seq_len tokens (BOS first where the index asks for it)."""
        text = self.text(i)
        return text if self.bos_first is None else np.concatenate([[self.bos_first], text])

    def text(self, i: int) -> np.ndarray:
        """The stream's tokens in sequence i (without the BOS __getitem__ puts in front)."""
        if not 0 <= i < self._num_sequences:
            raise IndexError(f"sequence {i} out of range for {self._num_sequences} sequences")
        return self.stream_slice(i * self._stride, (i + 1) * self._stride)

    @property
    def stream_tokens(self) -> int:
        """Length of the split's token stream (the sequences cut from it, and any tail too short for one)."""
        return int(self._starts[-1])

    def stream_slice(self, begin: int, end: int) -> np.ndarray:
        """Tokens [begin, end) of the split's stream, across shard and segment boundaries."""
        end = min(end, self.stream_tokens)
        if begin >= end:
            return np.zeros(0, dtype=np.int64)
        seg = int(np.searchsorted(self._starts, begin, side="right")) - 1
        pieces = []
        while begin < end:
            shard, start, stop = self._segments[seg]
            offset = start + begin - self._starts[seg]
            take = min(end - begin, stop - offset)
            pieces.append(self._shards[shard][offset:offset + take])
            begin += take
            seg += 1
        return np.concatenate(pieces).astype(np.int64)


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchIterator:
    """Infinite, deterministic, resumable per-rank batches over a `TokenShards`."""

    def __init__(self, ds: TokenShards, micro_batch_size: int, rank: int, world_size: int, seed: int):
        if len(ds) < micro_batch_size * world_size:
            raise ValueError(f"{ds.data_dir} {ds.split}: {len(ds)} sequences, fewer than one global batch "
                             f"({micro_batch_size} x {world_size} ranks); tokenize more text or lower "
                             "the micro batch size")
        self.ds, self.micro, self.rank, self.world, self.seed = ds, micro_batch_size, rank, world_size, seed
        self.samples_seen = 0
        self._perm: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def _sample(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.ds))
        if self._perm[0] != epoch:
            self._perm = (epoch, _permutation(len(self.ds), self.seed, epoch))
        return int(self._perm[1][offset])

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> torch.Tensor:
        first = self.samples_seen + self.rank * self.micro
        rows = [self.ds[self._sample(p)] for p in range(first, first + self.micro)]
        self.samples_seen += self.micro * self.world
        return torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen, "seed": self.seed, "num_sequences": len(self.ds),
                "micro_batch_size": self.micro, "world_size": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["num_sequences"] != len(self.ds):
            raise DataStateError(f"data state was saved with seed {state['seed']} over "
                                 f"{state['num_sequences']} sequences, this run has seed {self.seed} over "
                                 f"{len(self.ds)}; resume with the same seed and dataset, or start fresh")
        step = self.micro * self.world
        if state["samples_seen"] % step:
            raise DataStateError(f"data state: {state['samples_seen']} samples seen (saved with "
                                 f"{state['micro_batch_size']} x {state['world_size']} ranks) is not a "
                                 f"multiple of this run's {self.micro} x {self.world} ranks; keep the global "
                                 "batch (micro x ranks x grad_accum) the same as the checkpoint's")
        self.samples_seen = state["samples_seen"]


def eval_batches(ds: TokenShards, batch_size: int, rank: int, world_size: int,
                 max_batches: int) -> Iterator[torch.Tensor]:
    """The first sequences of `ds` in order, each rank its slice of every global batch; every rank
    yields the same number of batches (so collectives line up): min(max_batches, full global batches),
    max_batches <= 0 meaning all."""
    per_step = batch_size * world_size
    full = len(ds) // per_step
    if full == 0:
        raise ValueError(f"{ds.data_dir} {ds.split}: {len(ds)} sequences, fewer than one evaluation batch "
                         f"({batch_size} x {world_size} ranks); raise data.valid_fraction")
    for step in range(min(full, max_batches) if max_batches > 0 else full):
        first = step * per_step + rank * batch_size
        yield torch.from_numpy(np.stack([ds[i] for i in range(first, first + batch_size)]))

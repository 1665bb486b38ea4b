"""The training data loader: packed sequences across shards, per-rank slices, exact resume."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from maskprune.config import DataConfig, DataSource
from maskprune.data import BatchIterator, DataStateError, TokenShards, eval_batches
from maskprune.rundir import atomic_write_json
from maskprune.shard_writer import build_index

SEQ = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train tokens 0..2999 over two shards (1000 + 2000, so sequence 62 straddles them), valid 5000..5399."""
    root = tmp_path_factory.mktemp("data")
    work, shards = root / "work", root / "shards"
    work.mkdir()
    shards.mkdir()
    records = []
    for key, train, valid in (("a", range(0, 1000), range(5000, 5200)), ("b", range(1000, 3000), range(5200, 5400))):
        np.array(train, dtype=np.uint16).tofile(work / f"{key}.train.bin")
        np.array(valid, dtype=np.uint16).tofile(work / f"{key}.valid.bin")
        records.append({"key": key, "source": 0, "path": key, "start": 0, "stop": 1, "train_tokens": len(train),
                        "valid_tokens": len(valid), "train_docs": 1, "valid_docs": 1, "replaced_bytes": 0,
                        "files": []})
    cfg = DataConfig(sources=[DataSource(kind="text", path="x")], seq_len=SEQ)
    index = build_index(cfg, records, work, shards, {"eos_id": 0, "vocab_size": 6000}, "uint16")
    atomic_write_json(root / "index.json", index)
    return root


def first_tokens(batch) -> list[int]:
    """Sample ids: each sequence i starts with token i * SEQ."""
    return [int(row[0]) // SEQ for row in batch]


def test_sequences_are_packed_across_shards(data_dir: Path) -> None:
    ds = TokenShards(data_dir, "train")
    assert (len(ds), ds.seq_len, ds.num_tokens, ds.vocab_size) == (3000 // SEQ, SEQ, 3000, 6000)
    assert ds[62].tolist() == list(range(992, 1008)) and ds[62].dtype == np.int64
    assert ds[len(ds) - 1].tolist() == list(range(2976, 2992))
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert TokenShards(data_dir, "valid")[12].tolist() == list(range(5192, 5208))


def global_stream(ds: TokenShards, micro: int, world: int, steps: int, seed: int = 3,
                  state: dict | None = None) -> tuple[list[int], dict]:
    """Samples of `steps` global batches in (step, rank) order, and the state after them."""
    iters = [BatchIterator(ds, micro, r, world, seed) for r in range(world)]
    if state is not None:
        for it in iters:
            it.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
    out: list[int] = []
    for _ in range(steps):
        for it in iters:
            out += first_tokens(next(it))
    assert len({it.samples_seen for it in iters}) == 1
    return out, iters[0].state_dict()


def test_ranks_take_disjoint_slices_and_each_epoch_is_a_permutation(data_dir: Path) -> None:
    ds = TokenShards(data_dir, "train")  # 187 sequences
    stream, state = global_stream(ds, micro=3, world=2, steps=70)  # 420 samples: 2+ epochs
    n = len(ds)
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:2 * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]  # reshuffled per epoch
    assert state["samples_seen"] == 420
    assert stream == global_stream(ds, micro=3, world=2, steps=70)[0]  # deterministic
    assert stream != global_stream(ds, micro=3, world=2, steps=70, seed=4)[0]


@pytest.mark.parametrize("world_after,micro_after", [(2, 2), (1, 4), (4, 1)])
def test_exact_resume_also_with_another_world_size(data_dir: Path, world_after: int, micro_after: int) -> None:
    ds = TokenShards(data_dir, "train")
    full, _ = global_stream(ds, micro=2, world=2, steps=120)  # 480 samples over 2.5 epochs
    head, state = global_stream(ds, micro=2, world=2, steps=53)  # "killed" after 212 samples, mid-epoch
    tail, _ = global_stream(ds, micro_after, world_after, steps=(480 - 212) // (micro_after * world_after),
                            state=state)
    assert head + tail == full
    counts = Counter(head + tail)
    assert set(counts.values()) <= {2, 3} and sum(counts.values()) == 480  # none skipped or repeated


def test_resume_refuses_what_cannot_line_up(data_dir: Path) -> None:
    ds = TokenShards(data_dir, "train")
    _, state = global_stream(ds, micro=2, world=2, steps=1)  # 4 samples seen
    with pytest.raises(DataStateError, match="not a multiple of this run's 3 x 1 ranks"):
        BatchIterator(ds, 3, 0, 1, seed=3).load_state_dict(state)
    with pytest.raises(DataStateError, match="same seed"):
        BatchIterator(ds, 2, 0, 2, seed=9).load_state_dict(state)


def test_eval_batches_are_fixed_and_split_over_ranks(data_dir: Path) -> None:
    valid = TokenShards(data_dir, "valid")  # 25 sequences
    per_rank = [[first_tokens(b) for b in eval_batches(valid, 2, r, 3, max_batches=10)] for r in range(3)]
    assert [len(p) for p in per_rank] == [4, 4, 4]  # 25 // 6 full global batches on every rank
    seen = sorted(i - 5000 // SEQ for p in per_rank for b in p for i in b)
    assert len(seen) == len(set(seen)) == 24
    assert [first_tokens(b) for b in eval_batches(valid, 2, 0, 3, max_batches=2)] == per_rank[0][:2]


def optimizer_steps(ds: TokenShards, micro: int, accum: int, world: int, steps: int,
                    state: dict | None = None) -> tuple[list[list[int]], dict]:
    """Samples of each optimizer step (accum micro-steps on every rank) in consumption order."""
    iters = [BatchIterator(ds, micro, r, world, seed=3) for r in range(world)]
    for it in iters:
        if state is not None:
            it.load_state_dict(json.loads(json.dumps(state)))
    batches = []
    for _ in range(steps):
        batch: list[int] = []
        for _ in range(accum):
            for it in iters:
                batch += first_tokens(next(it))
        batches.append(batch)
    return batches, iters[0].state_dict()


@pytest.mark.parametrize("world_after,accum_after", [(1, 8), (4, 2), (8, 1)])
def test_same_global_batch_on_another_world_size_gives_the_same_samples(data_dir: Path, world_after: int,
                                                                         accum_after: int) -> None:
    """What a resume on another number of ranks relies on: with micro x grad_accum x ranks kept (here
    1 x 4 x 2 = 8), every optimizer step trains on the same samples in the same order, whatever the
    world size the step runs on; the switch mid-epoch neither repeats nor skips a sample."""
    ds = TokenShards(data_dir, "train")  # 187 sequences
    full, _ = optimizer_steps(ds, micro=1, accum=4, world=2, steps=40)  # 320 samples, 1.7 epochs
    head, state = optimizer_steps(ds, micro=1, accum=4, world=2, steps=17)  # stopped mid-epoch
    tail, _ = optimizer_steps(ds, micro=1, accum=accum_after,
                              world=world_after, steps=23, state=state)
    assert head + tail == full  # step by step, sample by sample
    flat = [i for batch in head + tail for i in batch]
    assert sorted(flat[:len(ds)]) == list(range(len(ds)))  # first epoch: each sample exactly once
    assert len(set(flat[len(ds):])) == len(flat) - len(ds)  # second epoch so far: no repeat

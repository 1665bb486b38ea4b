"""The tokenize stage's engine: work units → flat token files → the index that `maskprune.data` reads.

Each work unit (see `maskprune.corpus`) becomes two flat files, `<key>.train.bin` and `<key>.valid.bin`:
its documents' ids, each document followed by EOS. A document goes to validation when a keyed hash of
its text falls under `valid_fraction`, so the split depends on neither order nor worker count, and
duplicate documents never straddle the split. Files land in a work folder first and a unit's
`<key>.json` is written last, so an interrupted run reuses every finished unit.

Packing is virtual: a split is a list of (shard, start, stop) segments read as one token stream and
cut into `seq_len` sequences, so no tokens are lost at shard ends. The train split realises the
mixture weights and `max_train_tokens` by repeating or cutting each source's stream.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from maskprune.config import DataConfig, DataSource
from maskprune.corpus import WorkUnit, iter_unit_documents, replaced_bytes, unit_files
from maskprune.rundir import atomic_write_json, human_bytes

INDEX_FORMAT = "maskprune-tokens/1"
SPLITS = ("train", "valid")
BATCH_CHARS = 1 << 20  # documents handed to the Rust tokenizer at once


class DatasetError(ValueError):
    """A corpus/tokenizer combination that would give a wrong or empty dataset; says what to change."""


def choose_dtype(vocab_size: int, wanted: str) -> str:
    fits16 = vocab_size <= 1 << 16
    if wanted == "uint16" and not fits16:
        raise DatasetError(f"data.token_dtype = \"uint16\": the tokenizer has {vocab_size} tokens, more "
                           "than uint16 holds (65536); set data.token_dtype = \"uint32\" or \"auto\"")
    if vocab_size > 1 << 32:
        raise DatasetError(f"tokenizer has {vocab_size} tokens, more than uint32 holds")
    return "uint16" if wanted == "uint16" or (wanted == "auto" and fits16) else "uint32"


# Headroom on the estimated shard size: the tokens per byte are measured on the first documents only.
DISK_MARGIN = 1.25


def tokens_per_byte(core: Tokenizer, docs: list[str]) -> float:
    """Tokens (each document's EOS included) per UTF-8 byte of text, on `docs`."""
    text_bytes = sum(len(d.encode()) for d in docs)
    tokens = sum(len(enc.ids) + 1 for enc in core.encode_batch_fast(docs, add_special_tokens=False))
    return tokens / max(1, text_bytes)


def check_disk_space(units: list[WorkUnit], finished: set[str], per_byte: float, probe_docs: int, dtype: str,
                     folder: Path) -> None:
    """Refuse to start tokenizing what would not fit: the units still to do, at `per_byte` tokens per
    byte of their (approximate) size, written as `dtype`, against the free space under `folder`."""
    left = sum(u.size for u in units if u.key not in finished)
    need = int(left * per_byte * np.dtype(dtype).itemsize * DISK_MARGIN)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DatasetError(
            f"tokenize: the token shards need about {human_bytes(need)} ({human_bytes(left)} of input left to "
            f"tokenize x {per_byte:.3f} tokens per byte, measured on the first {probe_docs} documents, x "
            f"{np.dtype(dtype).itemsize} bytes per {dtype} token, x {DISK_MARGIN} headroom) but {folder} has "
            f"{human_bytes(free)} free; free space there or start the run in a directory on a larger file "
            "system (data.max_train_tokens does not help: every document is tokenized before it applies)")


def valid_mask(docs: list[str], seed: int, fraction: float) -> np.ndarray:
    """True for documents of the validation split: keyed hash of the text below `fraction`."""
    key = seed.to_bytes(8, "little", signed=True)
    cut = int(fraction * 2**64)
    return np.array([int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8, key=key).digest(), "little")
                     < cut for d in docs], dtype=bool)


def encode_docs(core: Tokenizer, docs: list[str], eos_id: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids with EOS after every document, length of each document incl. its EOS)."""
    ids = [enc.ids for enc in core.encode_batch_fast(docs, add_special_tokens=False)]
    lengths = np.fromiter((len(i) + 1 for i in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(chain.from_iterable((i, (eos_id,)) for i in ids)),
                       dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def tokenize_unit(unit: WorkUnit, source: DataSource, core: Tokenizer, eos_id: int, dtype: str,
                  cfg: DataConfig, work: Path) -> dict:
    """Write one unit's train/valid token files into `work` (or reuse them) and return its record."""
    record_path = work / f"{unit.key}.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    counts = {f"{s}_{k}": 0 for s in SPLITS for k in ("tokens", "docs")}
    replaced_before = replaced_bytes()
    tmp = {s: work / f".{unit.key}.{s}.bin.tmp{os.getpid()}" for s in SPLITS}
    handles = {s: open(tmp[s], "wb") for s in SPLITS}

    def flush(batch: list[str]) -> None:
        flat, lengths = encode_docs(core, batch, eos_id, dtype)
        in_valid = valid_mask(batch, cfg.seed, cfg.valid_fraction)
        token_valid = np.repeat(in_valid, lengths)
        for split, mask_docs, mask_tokens in (("train", ~in_valid, ~token_valid), ("valid", in_valid, token_valid)):
            part = flat[mask_tokens]
            part.tofile(handles[split])
            counts[f"{split}_tokens"] += int(part.size)
            counts[f"{split}_docs"] += int(mask_docs.sum())

    try:
        batch: list[str] = []
        chars = 0
        for doc in iter_unit_documents(unit, source, cfg.decode_errors):
            batch.append(doc)
            chars += len(doc)
            if chars >= BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
    finally:
        for handle in handles.values():
            handle.close()
    for split in SPLITS:
        os.replace(tmp[split], work / f"{unit.key}.{split}.bin")
    record = {"key": unit.key, "source": unit.source, "path": unit.path, "start": unit.start,
              "stop": unit.stop, **counts, "replaced_bytes": replaced_bytes() - replaced_before,
              "files": unit_files(unit, source)}
    atomic_write_json(record_path, record)  # last: marks the unit finished
    return record


def _take(segments: list[list[int]], need: int) -> list[list[int]]:
    """`need` tokens from the stream of `segments`, repeating it when it is shorter."""
    total = sum(stop - start for _, start, stop in segments)
    out: list[list[int]] = []
    while need > 0 and total > 0:
        for shard, start, stop in segments:
            take = min(stop - start, need)
            if take <= 0:
                break
            out.append([shard, start, start + take])
            need -= take
    return out


def build_index(cfg: DataConfig, records: list[dict], work: Path, shard_dir: Path,
                tokenizer_info: dict, dtype: str) -> dict:
    """Link unit files into `shard_dir` as numbered shards and describe the splits; rank 0 only."""
    shards: list[dict] = []
    streams: dict[str, list[list[list[int]]]] = {s: [[] for _ in cfg.sources] for s in SPLITS}
    for number, rec in enumerate(records):
        for split in SPLITS:
            tokens = rec[f"{split}_tokens"]
            if not tokens:
                continue
            name = f"{number:05d}.{split}.bin"
            os.link(work / f"{rec['key']}.{split}.bin", shard_dir / name)
            streams[split][rec["source"]].append([len(shards), 0, tokens])
            shards.append({"file": f"shards/{name}", "split": split, "tokens": tokens,
                           "source": rec["source"], "unit": [rec["path"], rec["start"], rec["stop"]]})
    sources = []
    for i, source in enumerate(cfg.sources):
        mine = [r for r in records if r["source"] == i]
        sources.append({"kind": source.kind, "path": source.path, "split": source.split,
                        "field": source.field, "weight": source.weight,
                        "files": [f for r in mine for f in r["files"]],
                        "replaced_bytes": sum(r["replaced_bytes"] for r in mine),
                        **{k: sum(r[k] for r in mine) for s in SPLITS for k in (f"{s}_tokens", f"{s}_docs")}})
    for info in sources:
        if not info["train_docs"] + info["valid_docs"]:
            raise DatasetError(f"data source {info['kind']} {info['path'] or info['split']!r}: no "
                               "documents (empty corpus); check the path, glob and data.sources.field")
    # Mixture: source s gets weight_s / sum(weights) of the train tokens.
    available = sum(s["train_tokens"] for s in sources)
    total = min(available, cfg.max_train_tokens) if cfg.max_train_tokens else available
    weight_sum = sum(s.weight for s in cfg.sources)
    train: list[list[int]] = []
    for i, source in enumerate(cfg.sources):
        need = round(total * source.weight / weight_sum)
        sources[i]["train_tokens_used"] = need if sources[i]["train_tokens"] else 0
        train += _take(streams["train"][i], need)
    splits = {"train": train, "valid": [seg for per_source in streams["valid"] for seg in per_source]}
    index_splits = {}
    bos_first = tokenizer_info.get("bos_first")  # BOS opens every sequence: seq_len - 1 stream tokens each
    stride = cfg.seq_len - (bos_first is not None)
    for split, segments in splits.items():
        tokens = sum(stop - start for _, start, stop in segments)
        if tokens < stride:
            fix = "data.valid_fraction" if split == "valid" else "data.max_train_tokens or the corpus"
            raise DatasetError(f"data: the {split} split has {tokens} tokens, less than one sequence "
                               f"(data.seq_len = {cfg.seq_len}); raise {fix}")
        index_splits[split] = {"segments": segments, "tokens": tokens, "sequences": tokens // stride}
    return {"format": INDEX_FORMAT, "seq_len": cfg.seq_len, "dtype": dtype, "bos_first": bos_first,
            "eos_id": tokenizer_info["eos_id"], "vocab_size": tokenizer_info["vocab_size"],
            "tokenizer": tokenizer_info, "seed": cfg.seed, "valid_fraction": cfg.valid_fraction,
            "max_train_tokens": cfg.max_train_tokens, "decode_errors": cfg.decode_errors,
            "replaced_bytes": sum(s["replaced_bytes"] for s in sources),
            "shards": shards, "sources": sources, "splits": index_splits}

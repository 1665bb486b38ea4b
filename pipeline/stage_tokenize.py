"""Stage 1, tokenize: the configured corpus as packed token shards (see maskprune.shard_writer).

    python pipeline/stage_tokenize.py --run-dir runs/tiny                  # local processes
    mpirun -np 8 python pipeline/stage_tokenize.py --run-dir runs/big      # or srun, one task per rank

Rank 0 plans the work units and loads (or trains) the tokenizer, every rank tokenizes its share of
units into RUN/tokenize/work/, and rank 0 links the finished units into shards/, writes tokenizer.json
and index.json (last, so an interrupted run never looks finished) and drops the work folder. A rerun
after a kill reuses every unit that finished.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from itertools import islice
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from maskprune.config import DataConfig
from maskprune.corpus import WorkUnit, iter_documents, iter_unit_documents, plan_units
from maskprune.families import family_of
from maskprune.rundir import RunDirError, atomic_write_json, atomic_write_text
from maskprune.shard_writer import build_index, check_disk_space, choose_dtype, tokenize_unit, tokens_per_byte
from maskprune.stage import StageRun, publish_dir, run_stage, staging_dir
from maskprune.tokenization import load_tokenizer, model_vocab_size, train_sentencepiece

SP_TRAIN_DOCS = 1_000_000  # documents a trained SentencePiece model sees, from the start of the corpus
PROBE_DOCS = 200           # documents a converted SentencePiece tokenizer is checked on


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] tokenize: {message}", flush=True)


# Set for each task by mpirun (Open MPI, MPICH / Intel MPI) and srun. Not SLURM_NTASKS: a batch script
# (where `maskprune run` starts this stage as one process) has it too, and reading it made the stage
# join a one-rank MPI world and tokenize in a single process on a node full of allocated cores. Read
# directly rather than through maskprune.dist, whose torch import would cost every rank seconds.
WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")


def mpi_comm():
    """COMM_WORLD when started by mpirun/srun with more than one rank, else None (local processes)."""
    if any(int(os.environ.get(name, "1")) > 1 for name in WORLD_SIZE_VARS):
        from mpi4py import MPI

        return MPI.COMM_WORLD
    return None


def local_workers(configured: int, ranks_on_node: int, units: int) -> int:
    """Tokenizer processes for this rank: `data.workers`, else this node's usable cores shared by its
    ranks. Usable = the CPU affinity mask, which Slurm's cgroup/cpuset narrows to the job's cores
    (os.cpu_count() would count the whole node's and oversubscribe a shared one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = configured or max(1, cores // max(1, ranks_on_node))
    return min(wanted, max(1, units))


def bos_first(cfg: DataConfig, model_dir: Path) -> int | None:
    """The BOS id to open every sequence with, for a model family trained that way (Gemma) and
    tokenized with its own tokenizer; None otherwise."""
    config = json.loads((model_dir / "config.json").read_text())
    wanted = cfg.tokenizer == "model" and family_of(config).bos_first
    return config.get("bos_token_id") if wanted else None


def probe_documents(cfg: DataConfig, units: list[WorkUnit]) -> list[str]:
    """The corpus's first documents: a converted tokenizer is checked on them, and the tokens per
    byte that size the shards are measured on them."""
    return list(islice((d for u in units[:4] for d in iter_unit_documents(u, cfg.sources[u.source],
                                                                         cfg.decode_errors)), PROBE_DOCS))


def setup(cfg: DataConfig, model_dir: Path, work: Path) -> dict:
    """Rank 0: work units, tokenizer and dtype, as plain data every rank can receive."""
    chunk = int(cfg.chunk_mb * (1 << 20))
    units = [u for i, source in enumerate(cfg.sources) for u in plan_units(i, source, chunk)]
    probe = probe_documents(cfg, units)
    trained = None
    if cfg.tokenizer == "train_sentencepiece":
        cached = work / "trained_sentencepiece.model"
        if not cached.is_file():
            texts = islice((d for s in cfg.sources for d in iter_documents(s, cfg.decode_errors)), SP_TRAIN_DOCS)
            vocab = cfg.tokenizer_vocab_size or model_vocab_size(model_dir)
            data = train_sentencepiece(texts, vocab)
            cached.with_suffix(".tmp").write_bytes(data)
            cached.with_suffix(".tmp").replace(cached)
        trained = cached.read_bytes()
    tok = load_tokenizer(cfg, model_dir, probe, trained)
    info = {"kind": tok.kind, "source": tok.source, "fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "file": "tokenizer.json",
            "bos_first": bos_first(cfg, model_dir)}
    dtype = choose_dtype(tok.vocab_size, cfg.token_dtype)
    finished = {u.key for u in units if (work / f"{u.key}.json").is_file()}  # by an earlier, killed run
    if probe:  # an empty corpus is refused, with its own message, once tokenized
        check_disk_space(units, finished, tokens_per_byte(tok.core, probe), len(probe), dtype, work)
    return {"units": units, "tokenizer_json": tok.core.to_str(), "info": info, "dtype": dtype,
            "finished": len(finished)}


def assign(units: list[WorkUnit], world: int) -> list[list[int]]:
    """Unit numbers per rank: largest first onto the least loaded rank (deterministic)."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for number in sorted(range(len(units)), key=lambda n: (-units[n].size, n)):
        target = loads.index(min(loads))
        shares[target].append(number)
        loads[target] += units[number].size
    return shares


# What every tokenizer process uses; set once in the parent and inherited by forked workers.
_worker: dict = {}


def _run_unit(unit: WorkUnit) -> dict:
    w = _worker
    return tokenize_unit(unit, w["cfg"].sources[unit.source], w["core"], w["eos_id"], w["dtype"], w["cfg"],
                         w["work"])


def tokenize_units(units: list[WorkUnit], workers: int, show: bool) -> list[dict]:
    """Records of `units` in the given order, tokenized by `workers` processes (1 = this process)."""
    sizes = {u.key: u.size for u in units}
    records: dict[str, dict] = {}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, disable=not show,
               desc="tokenize", file=sys.stderr)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    tokens = 0
    try:
        for record in pool.imap_unordered(_run_unit, units) if pool else map(_run_unit, units):
            records[record["key"]] = record
            tokens += record["train_tokens"] + record["valid_tokens"]
            bar.update(sizes[record["key"]])
            bar.set_postfix(tokens=f"{tokens:,}")
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return [records[u.key] for u in units]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True, help="run directory made by `maskprune run`")
    args = parser.parse_args()
    comm = mpi_comm()
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    run = StageRun("tokenize", args.run_dir, is_rank0=rank == 0)
    cfg = run.cfg.data
    work = run.dir / "work"
    work.mkdir(exist_ok=True)

    def collective(ok: bool, error: str) -> None:
        """Every rank learns whether any failed; rank 0 reports the first error, all exit 2."""
        errors = comm.allgather(None if ok else error) if comm else [None if ok else error]
        failed = [e for e in errors if e]
        if failed:
            if rank == 0:
                print(f"maskprune: error: {failed[0]}", file=sys.stderr)
            sys.exit(2)

    plan, error = None, ""
    if rank == 0:
        try:
            plan = setup(cfg, Path(run.upstream("prepare", "model")), work)
        except (ValueError, RunDirError) as err:
            error = str(err)
    collective(not error, error)
    plan = comm.bcast(plan, root=0) if comm else plan
    units = plan["units"]
    finished = plan["finished"]
    if rank == 0:
        log(f"{len(units)} work units from {len(cfg.sources)} source(s)"
            + (f", {finished} already finished (resuming)" if finished else "")
            + f"; tokenizer {plan['info']['kind']} ({plan['info']['vocab_size']} tokens), {plan['dtype']}")
    _worker.update(core=Tokenizer.from_str(plan["tokenizer_json"]), eos_id=plan["info"]["eos_id"],
                   dtype=plan["dtype"], cfg=cfg, work=work)
    mine = [units[n] for n in sorted(assign(units, world)[rank])]
    started = time.time()
    ranks_on_node = 1
    if comm:
        from mpi4py import MPI

        ranks_on_node = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()  # this node's ranks
    workers = local_workers(cfg.workers, ranks_on_node, len(mine))
    records, error = [], ""
    try:
        records = tokenize_units(mine, workers, show=rank == 0)
    except ValueError as err:
        error = str(err)
    collective(not error, error)
    gathered = comm.gather(records, root=0) if comm else [records]
    if rank != 0:
        return 0
    by_key = {r["key"]: r for part in gathered for r in part}
    ordered = [by_key[u.key] for u in units]
    tokens = sum(r["train_tokens"] + r["valid_tokens"] for r in ordered)
    elapsed = time.time() - started
    log(f"{tokens:,} tokens in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):,.0f} tokens/s) on {world} "
        f"rank(s) x {workers} process(es)")
    final = run.dir / "shards"
    tmp = staging_dir(final)
    try:
        index = build_index(cfg, ordered, work, tmp, plan["info"], plan["dtype"])
    except ValueError as err:
        shutil.rmtree(tmp)
        print(f"maskprune: error: {err}", file=sys.stderr)
        return 2
    publish_dir(tmp, final)
    atomic_write_text(run.dir / "tokenizer.json", plan["tokenizer_json"])
    atomic_write_json(run.dir / "index.json", index)
    shutil.rmtree(work)
    replaced = index["replaced_bytes"]
    if replaced:
        log(f"WARNING: {replaced} undecodable bytes replaced by U+FFFD (data.decode_errors = \"replace\"); "
            "per source counts in index.json")
    train, valid = index["splits"]["train"], index["splits"]["valid"]
    log(f"train {train['tokens']:,} tokens ({train['sequences']:,} x {cfg.seq_len}), valid "
        f"{valid['tokens']:,} tokens ({valid['sequences']:,} sequences) -> {run.dir}")
    run.finish({"data": str(run.dir), "train_tokens": train["tokens"], "valid_tokens": valid["tokens"]})
    return 0


if __name__ == "__main__":
    run_stage(main)

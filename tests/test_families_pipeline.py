"""Each non-Llama family through the whole pipeline on 2 ZeRO-3 CPU ranks (the tiny Llama's own run
is tests/test_pipeline.py): `maskprune run configs/tiny.toml --set model.tiny.family=F` with the
fewest steps that still run every stage (mask-learn with its hardening phase, hard-prune, continued
pretraining, export, evaluate), then tools/zero_to_hf.py on the mask-learn checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import REPO, cpu_env, run_cli
from maskprune.data import TokenShards
from maskprune.families import FAMILIES

pytestmark = pytest.mark.slow

FEWEST = ["model.tiny.pretrain_steps=30", "data.max_train_tokens=60000",
          "mask_learn.train.steps=4", "mask_learn.budget_warmup_fraction=0.5", "mask_learn.calibration_batches=2",
          "mask_learn.train.checkpoint_every=4", "mask_learn.train.eval_every=4", "mask_learn.train.eval_batches=2",
          "continued_pretrain.train.steps=2", "continued_pretrain.train.checkpoint_every=2",
          "continued_pretrain.train.eval_every=2", "continued_pretrain.train.eval_batches=2",
          "evaluate.ppl_chunk_lengths=[128]", "evaluate.eval_text_max_tokens=2000", "evaluate.throughput_steps=1"]


@pytest.mark.parametrize("family", [name for name in FAMILIES if name != "llama"])
def test_family_goes_through_every_stage(tmp_path: Path, family: str) -> None:
    run_dir = tmp_path / "run"
    overrides = [a for o in [f"model.tiny.family={family}", *FEWEST] for a in ("--set", o)]
    run_cli("run", "configs/tiny.toml", "--run-dir", str(run_dir), *overrides, timeout=1500)
    info = json.loads(run_cli("status", str(run_dir), "--json").stdout)
    assert all(stage["status"] == "done" for stage in info["stages"].values())
    architecture = FAMILIES[family].architecture

    report = json.loads((run_dir / "hard_prune" / "model" / "prune_report.json").read_text())
    assert report["architecture"] == architecture and report["lora_merged"]
    assert report["equivalence"]["mode"] == "logits" and report["max_abs_diff"] == 0.0

    final = AutoModelForCausalLM.from_pretrained(info["final_checkpoint"])  # plain, no remote code
    source = AutoModelForCausalLM.from_pretrained(info["stages"]["prepare"]["outputs"]["model"])
    assert type(final).__name__ == type(source).__name__ == architecture
    assert final.num_parameters() < source.num_parameters()
    attn = [FAMILIES[family].attn_module(layer) for layer in final.model.layers]
    assert len({a.q_proj.weight.shape for a in attn}) == len({a.k_proj.weight.shape for a in attn}) == 1
    assert final.config.num_attention_heads < source.config.num_attention_heads or \
        final.config.intermediate_size < source.config.intermediate_size
    # Gemma is trained with BOS opening every sequence: its training sequences get it too.
    shards = TokenShards(run_dir / "tokenize", "train")
    bos = source.config.bos_token_id if FAMILIES[family].bos_first else None
    assert shards.bos_first == bos and len(shards[0]) == 128
    text = shards.text(0).tolist()
    assert len(text) == 128 - (bos is not None) and shards[0].tolist()[-len(text):] == text
    assert bos is None or shards[0][0] == bos
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    assert set(results["models"]) == {"dense", "pruned", "pruned+cpt"}

    # The same masks and LoRA from the mask-learn ZeRO-3 checkpoint itself.
    out = tmp_path / "from_checkpoint"
    proc = subprocess.run([sys.executable, "tools/zero_to_hf.py", str(run_dir / "mask_learn" / "checkpoints"),
                           str(out)], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed["max_abs_diff"] == 0.0 and printed["config"] == report["config"]
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    pruned = AutoModelForCausalLM.from_pretrained(run_dir / "hard_prune" / "model", dtype=torch.float64)
    ids = torch.randint(0, source.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, pruned(input_ids=ids).logits)

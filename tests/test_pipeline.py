"""The walking skeleton: `maskprune run` carries a tiny GQA Llama through every stage on 2 ZeRO-3
CPU ranks and out as a plain, uniform Hugging Face checkpoint; reruns, resets and config changes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import copy_run
from helpers import run_cli
from maskprune.rundir import RunDir

pytestmark = pytest.mark.slow

SHORT = ["--set", "mask_learn.train.steps=8", "--set", "mask_learn.budget_warmup_fraction=0.375",
         "--set", "mask_learn.train.checkpoint_every=4", "--set", "mask_learn.train.eval_every=4",
         "--set", "continued_pretrain.train.steps=6", "--set", "continued_pretrain.train.checkpoint_every=3",
         "--set", "continued_pretrain.train.eval_every=3"]


@pytest.fixture(scope="module")
def finished(tiny_tokenized: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = copy_run(tiny_tokenized, tmp_path_factory.mktemp("pipeline") / "run")
    out = run_cli("run", "configs/tiny.toml", "--run-dir", str(run_dir), *SHORT, timeout=1500).stdout
    (run_dir.parent / "run.log").write_text(out)
    return run_dir


def status(run_dir: Path) -> dict:
    return json.loads(run_cli("status", str(run_dir), "--json").stdout)


def test_final_checkpoint_is_a_plain_uniform_smaller_hf_model(finished: Path) -> None:
    info = status(finished)
    assert all(stage["status"] == "done" for stage in info["stages"].values())
    final = Path(info["final_checkpoint"])
    assert final == finished / "export" / "model"
    model = AutoModelForCausalLM.from_pretrained(final)  # no custom code, no trust_remote_code
    source = AutoModelForCausalLM.from_pretrained(info["stages"]["prepare"]["outputs"]["model"])
    q_rows = {layer.self_attn.q_proj.weight.shape[0] for layer in model.model.layers}
    kv_rows = {layer.self_attn.k_proj.weight.shape[0] for layer in model.model.layers}
    ffn = {layer.mlp.gate_proj.weight.shape[0] for layer in model.model.layers}
    assert len(q_rows) == len(kv_rows) == len(ffn) == 1  # every layer the same shape
    assert q_rows == {model.config.num_attention_heads * model.config.head_dim}
    assert ffn == {model.config.intermediate_size}
    assert model.num_parameters() < source.num_parameters()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert model(input_ids=ids).logits.shape == (1, 16, model.config.vocab_size)
    results = json.loads((finished / "evaluate" / "results.json").read_text())
    assert set(results["models"]) == {"dense", "pruned", "pruned+cpt"}


def test_export_runs_after_the_training_job_has_exited(finished: Path) -> None:
    log = (finished.parent / "run.log").read_text()
    training = log[log.index("[maskprune] continued_pretrain: running"):log.index("[maskprune] export: running")]
    assert "resumed from" not in training and "final checkpoint" in training
    assert "] export: " not in training  # the distributed job itself exported nothing
    assert f"-> {finished / 'export' / 'model'}" in log[log.index("[maskprune] export: running"):]
    run = RunDir(finished)
    cpt, export = run.state("continued_pretrain"), run.state("export")
    assert set(cpt.outputs) == {"checkpoints", "final_tag", "select"} and cpt.outputs["final_tag"] == "step00000006"
    assert cpt.outputs["select"] == "last"
    assert not (finished / "continued_pretrain" / "model").exists()
    # `maskprune run` marks a stage running only after the previous stage's process tree returned.
    assert export.started_at > cpt.finished_at


def test_rerun_of_a_finished_run_does_nothing_and_says_so(finished: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("state.json")}
    out = run_cli("run", "configs/tiny.toml", "--run-dir", str(finished), *SHORT).stdout
    assert "nothing to do" in out
    assert out.count("done, skipped") == 7
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("state.json")} == before


def test_changed_config_is_refused_without_force(finished: Path) -> None:
    proc = run_cli("run", "configs/tiny.toml", "--run-dir", str(finished), *SHORT,
                   "--set", "continued_pretrain.train.lr=5e-4", check=False)
    assert proc.returncode == 2
    assert "continued_pretrain" in proc.stderr and "--force" in proc.stderr
    assert "mask_learn" not in proc.stderr


def test_reset_reruns_that_stage_and_the_ones_after_it(finished: Path) -> None:
    before = status(finished)["stages"]
    run_cli("reset", str(finished), "hard_prune")
    out = run_cli("run", "configs/tiny.toml", "--run-dir", str(finished), *SHORT, timeout=1500).stdout
    after = status(finished)["stages"]
    for stage in ("prepare", "tokenize", "mask_learn"):
        assert f"{stage}: done, skipped" in out
    for stage in ("hard_prune", "continued_pretrain", "export", "evaluate"):
        assert f"{stage}: running" in out
        assert after[stage]["attempts"] == before[stage]["attempts"] + 1


def test_a_moved_run_directory_reruns_from_its_own_files(finished: Path, tmp_path: Path) -> None:
    """Moved as a whole (copied, the original then out of reach), a run directory's records and
    checkpoints name its own files: export re-runs from the moved recovery checkpoint, whose model
    is the moved hard_prune/model, and writes the same weights as before the move."""
    moved = Path(shutil.copytree(finished, tmp_path / "moved"))
    out_of_reach = finished.rename(finished.with_name("out_of_reach"))
    try:
        run_cli("reset", str(moved), "export")
        out = run_cli("run", "configs/tiny.toml", "--run-dir", str(moved), *SHORT, timeout=900).stdout
    finally:
        out_of_reach.rename(finished)
    assert "continued_pretrain: done, skipped" in out and "export: running" in out
    info = status(moved)
    assert info["final_checkpoint"] == str(moved / "export" / "model")
    for stage in ("hard_prune", "continued_pretrain", "export", "evaluate"):
        paths = [v for v in info["stages"][stage]["outputs"].values() if isinstance(v, str) and v.startswith("/")]
        assert paths and all(Path(v).is_relative_to(moved) for v in paths), (stage, paths)
    before, after = ({k: v for shard in sorted((run / "export" / "model").glob("*.safetensors"))
                      for k, v in load_file(str(shard)).items()} for run in (finished, moved))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

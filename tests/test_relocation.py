"""A run directory moved or copied as a whole (off a purged scratch file system, onto a larger one,
as the out-of-space refusal tells users to) reads its own files: state.json records the outputs
inside it relative to it, and checkpoints name their model relative to themselves. Paths outside it
(a source model elsewhere, a branch's upstream run) stay absolute. The whole pipeline after a move:
tests/test_pipeline.py."""
from __future__ import annotations

import json
from pathlib import Path

from maskprune.config import ExperimentConfig
from maskprune.rundir import RunDir, branch_run
from maskprune.training import META_FILE, Checkpointer
from maskprune.zero_checkpoint import read_meta


def recorded(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.write_config(ExperimentConfig())
    run.mark_done("prepare", {"model": str(tmp_path / "elsewhere" / "llama"), "params": 7})
    run.mark_done("hard_prune", {"model": str(run.stage_dir("hard_prune") / "model"), "params": 5})
    run.mark_done("continued_pretrain", {"checkpoints": str(run.stage_dir("continued_pretrain") / "checkpoints"),
                                         "final_tag": "step00000006", "select": "last"})
    return run


def test_outputs_inside_the_run_are_recorded_relative_and_read_absolute(tmp_path: Path) -> None:
    run = recorded(tmp_path)
    on_disk = json.loads((run.stage_dir("continued_pretrain") / "state.json").read_text())
    assert on_disk["outputs"] == {"checkpoints": "continued_pretrain/checkpoints", "final_tag": "step00000006",
                                  "select": "last"}
    assert on_disk["relative_outputs"] == ["checkpoints"]
    assert json.loads((run.stage_dir("prepare") / "state.json").read_text())["outputs"]["model"] == \
        str(tmp_path / "elsewhere" / "llama")
    assert run.state("hard_prune").outputs == {"model": str(run.root / "hard_prune" / "model"), "params": 5}


def test_a_moved_run_reads_its_own_outputs(tmp_path: Path) -> None:
    run = recorded(tmp_path)
    moved = RunDir((tmp_path / "run").rename(tmp_path / "larger_disk"))
    assert moved.final_checkpoint() == str(tmp_path / "larger_disk" / "hard_prune" / "model")
    assert moved.state("continued_pretrain").outputs["checkpoints"] == \
        str(tmp_path / "larger_disk" / "continued_pretrain" / "checkpoints")
    assert moved.state("prepare").outputs["model"] == str(tmp_path / "elsewhere" / "llama")  # outside: as it was
    assert moved.summary()["stages"]["hard_prune"]["outputs"]["model"] == moved.final_checkpoint()
    assert not run.root.exists()


def test_records_of_earlier_versions_are_read_as_written(tmp_path: Path) -> None:
    run = recorded(tmp_path)
    path = run.stage_dir("hard_prune") / "state.json"
    record = json.loads(path.read_text())
    del record["relative_outputs"]
    record["outputs"]["model"] = "/old/run/hard_prune/model"  # absolute, as versions before this one wrote
    path.write_text(json.dumps(record))
    assert run.state("hard_prune").outputs["model"] == "/old/run/hard_prune/model"


def test_a_branch_reads_the_finished_stages_outputs_where_they_are(tmp_path: Path) -> None:
    run = recorded(tmp_path)
    (run.stage_dir("hard_prune") / "model").mkdir()
    (run.stage_dir("hard_prune") / "model" / "config.json").write_text("{}")
    branch = branch_run(run.root, tmp_path / "branch", skip=("model",))
    assert not (branch.root / "hard_prune" / "model").exists()
    assert branch.final_checkpoint() == str(run.root / "hard_prune" / "model")
    assert json.loads((branch.stage_dir("hard_prune") / "state.json").read_text())["relative_outputs"] == []
    assert run.state("hard_prune").outputs["model"] == str(run.root / "hard_prune" / "model")  # source untouched


def test_checkpoint_meta_names_the_runs_model_relative_to_itself(tmp_path: Path) -> None:
    root = tmp_path / "run"
    model, outside = root / "hard_prune" / "model", tmp_path / "models" / "llama"
    for folder in (model, outside):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    tag = root / "continued_pretrain" / "checkpoints" / "step00000003"
    tag.mkdir(parents=True)
    portable = Checkpointer(tag.parent, 1, run_root=root)._portable(
        {"stage": "continued_pretrain", "model_dir": model, "reconstruction": str(root / "mask_learn" / "fit"),
         "masks": "maskprune_masks.safetensors", "lora": None}, tag)
    assert portable["model_dir"] == "../../../hard_prune/model"
    assert portable["reconstruction"] == "../../../mask_learn/fit"
    assert portable["masks"] == "maskprune_masks.safetensors" and portable["lora"] is None
    (tag / META_FILE).write_text(json.dumps({**portable, "step": 3}))
    moved = root.rename(tmp_path / "moved")
    meta = read_meta(moved / "continued_pretrain" / "checkpoints" / "step00000003")
    assert meta.model_dir == (moved / "hard_prune" / "model").resolve()
    assert meta.reconstruction == (moved / "mask_learn" / "fit").resolve()
    # A source model outside the run (model.source = "hf") stays where the user keeps it.
    elsewhere = Checkpointer(tag.parent, 1, run_root=moved)._portable({"model_dir": outside}, tag)
    assert elsewhere["model_dir"] == str(outside)

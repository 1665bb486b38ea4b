"""What `maskprune run` decides for a run directory's finished stages when the config it is given
differs from the one they ran with: every changed field named with its old and new value, and a
field that an upgrade added (absent from the record, at its default now) not counted as a change,
so an upgrade between preemptions does not throw away finished stages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import REPO
from maskprune.config import load_config
from maskprune.rundir import STAGES, RunDir, StageState, _digest, plan


def finished(tmp_path: Path, *sets: str) -> tuple[RunDir, object]:
    """A run directory whose every stage is recorded done with configs/tiny.toml (+ `sets`)."""
    cfg = load_config(REPO / "configs" / "tiny.toml", list(sets))
    run = RunDir(tmp_path / "run")
    run.write_config(cfg)
    for stage in STAGES:
        run.mark_running(stage, cfg)
        run.mark_done(stage, {})
    return run, cfg


def decisions(run: RunDir, *sets: str, force: bool = False) -> dict[str, tuple[str, str]]:
    cfg = load_config(REPO / "configs" / "tiny.toml", list(sets))
    return {d.stage: (d.action, d.reason) for d in plan(run, cfg, force=force)}


def rewrite_record(run: RunDir, stage: str, edit) -> None:
    """The stage's record as another maskprune version would have written it: `edit` changes the
    stored config, and the hash is that version's hash of it."""
    state = run.state(stage)
    edit(state.config)
    state.config_hash = _digest(state.config)
    run.save_state(state)


def test_an_unchanged_config_skips_every_stage(tmp_path: Path) -> None:
    run, _ = finished(tmp_path)
    assert decisions(run) == {stage: ("skip", "done") for stage in STAGES}
    assert run.state("mask_learn").config["mask_learn"]["train"]["lr"] == 1e-3


def test_a_changed_field_is_refused_naming_it_with_both_values(tmp_path: Path) -> None:
    run, _ = finished(tmp_path)
    plan_ = decisions(run, "mask_learn.train.lr=5e-4", "data.seq_len=64")
    assert plan_["prepare"] == ("refuse", "config changed: data.seq_len: 128 -> 64")
    assert plan_["mask_learn"] == ("refuse", "config changed: mask_learn.train.lr: 0.001 -> 0.0005")
    # hard_prune reads none of it: not refused, but it runs again after its input stage.
    assert plan_["hard_prune"][0] == "skip"
    assert decisions(run, "mask_learn.train.lr=5e-4", force=True)["mask_learn"] == ("run", "config changed (--force)")
    # A list of tables (data.sources) names the entry that changed.
    assert decisions(run, "data.sources=[{kind = 'corpus', path = 'sotu', weight = 2.0}]")["tokenize"][1] \
        .startswith("config changed: data.sources[0].kind: ")
    two = "data.sources=[{kind = 'treebank'}, {kind = 'corpus', path = 'sotu'}]"
    assert decisions(run, two)["tokenize"][1].startswith('config changed: data.sources[1].field: (absent) -> "text"')


def test_a_field_added_by_an_upgrade_keeps_the_finished_stage(tmp_path: Path) -> None:
    run, _ = finished(tmp_path)
    # Written by a version without mask_learn.bias_compensation (its default, false, is that
    # version's behaviour).
    rewrite_record(run, "mask_learn", lambda config: config["mask_learn"].pop("bias_compensation"))
    assert decisions(run)["mask_learn"] == (
        "skip", "done (ran before mask_learn.bias_compensation existed; taken at this version's default)")
    # Set to anything but its default, it is a change like any other.
    assert decisions(run, "mask_learn.bias_compensation=true", "mask_learn.hardening_fraction=0.5")["mask_learn"] == (
        "refuse", "config changed: mask_learn.bias_compensation: false -> true; "
                  "mask_learn.hardening_fraction: 0.25 -> 0.5")


def test_a_one_shot_cut_ignores_the_learners_settings(tmp_path: Path) -> None:
    # A baseline beside a MaskPrune sweep: retuning the learner must not re-run (or refuse) its cut.
    run, _ = finished(tmp_path, "mask_learn.method=wanda_sp")
    assert "hardening_fraction" not in run.state("mask_learn").config["mask_learn"]
    learner = ("mask_learn.hardening_fraction=0.5", "mask_learn.lora.rank=4", "mask_learn.distill.temperature=3.0")
    assert decisions(run, "mask_learn.method=wanda_sp", *learner) == {stage: ("skip", "done") for stage in STAGES}
    # What the cut does read is still a change.
    assert decisions(run, "mask_learn.method=wanda_sp", "mask_learn.calibration_batches=4")["mask_learn"] == (
        "refuse", "config changed: mask_learn.calibration_batches: 8 -> 4")
    assert decisions(run, "mask_learn.method=flap")["mask_learn"] == (
        "refuse", 'config changed: mask_learn.method: "wanda_sp" -> "flap"')
    # Switching to MaskPrune names the method, not each learner setting that comes with it.
    assert decisions(run)["mask_learn"] == ("refuse", 'config changed: mask_learn.method: "wanda_sp" -> "maskprune"')
    # A cut recorded with the learner's settings in its fingerprint (before they were left out)
    # is kept too.
    rewrite_record(run, "mask_learn", lambda config: config["mask_learn"].update(hardening_fraction=0.25))
    assert decisions(run, "mask_learn.method=wanda_sp", *learner)["mask_learn"] == ("skip", "done")
    # MaskPrune's own run reads them.
    run, _ = finished(tmp_path / "maskprune")
    assert decisions(run, "mask_learn.hardening_fraction=0.5")["mask_learn"] == (
        "refuse", "config changed: mask_learn.hardening_fraction: 0.25 -> 0.5")


def test_a_field_this_version_no_longer_has_is_a_change(tmp_path: Path) -> None:
    run, _ = finished(tmp_path)
    rewrite_record(run, "continued_pretrain", lambda config: config["continued_pretrain"].update(old_knob=3))
    assert decisions(run)["continued_pretrain"] == (
        "refuse", "config changed: continued_pretrain.old_knob: 3 -> (no such setting now)")


def test_a_record_without_its_config_is_refused_saying_so(tmp_path: Path) -> None:
    run, _ = finished(tmp_path)
    path = run.stage_dir("export") / "state.json"
    record = json.loads(path.read_text())
    del record["config"], record["relative_outputs"]  # as an older version wrote it
    record["config_hash"] = "0123456789abcdef"  # an older version's hash of an older config
    path.write_text(json.dumps(record))
    assert run.state("export") == StageState(**record)
    action, reason = decisions(run)["export"]
    assert action == "refuse" and "not listed (the stage was recorded by a maskprune that did not keep its config)" in reason


@pytest.mark.parametrize("stage", ["prepare", "evaluate"])
def test_the_record_keeps_exactly_the_sections_the_stage_reads(tmp_path: Path, stage: str) -> None:
    run, cfg = finished(tmp_path)
    expected = {"prepare": {"model", "data.sources", "data.seq_len"}, "evaluate": {"evaluate", "data.eval_text"}}
    assert set(run.state(stage).config) == expected[stage]

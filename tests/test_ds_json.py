"""A training stage's DeepSpeed JSON is frozen into its stage folder when it starts, and a resume
trains under that copy: found from any working directory, updated by placement changes (offload,
buckets), refused on any other change unless --force starts the stage over. `maskprune run`'s
refusal, one line and nothing written: tests/test_bad_inputs.py (ds_config_changed_on_resume); a
real 2-rank resume under a changed placement: tests/test_continued_pretrain.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import REPO
from maskprune.config import ExperimentConfig
from maskprune.ds_json import SOURCE_ROOT, DsConfigMissing, differences, frozen_path, resolve, settle
from maskprune.rundir import RunDir, StageState, plan
from maskprune.stage import StageRun

CPU = "ds_configs/zero3_cpu_fp32.json"
ZERO3 = json.loads((REPO / CPU).read_text())


def with_changes(**paths: object) -> dict:
    """ZERO3 with `a__b=value` set at a.b."""
    ds = json.loads(json.dumps(ZERO3))
    for dotted, value in paths.items():
        *parents, last = dotted.split("__")
        node = ds
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return ds


def test_a_relative_path_is_found_from_outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert SOURCE_ROOT == REPO
    assert resolve(CPU) == REPO / CPU
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3_cpu_fp32.json").write_text("{}")
    assert resolve(CPU) == tmp_path / CPU  # the working directory's own file comes first
    with pytest.raises(DsConfigMissing, match=f"ds_config ds_configs/nope.json: not found \\(looked in {tmp_path} "
                                              f"and {REPO}\\); use one of ds_configs/\\*.json"):
        resolve("ds_configs/nope.json")


def test_placement_may_change_on_resume_and_nothing_else() -> None:
    training, placement = differences(ZERO3, with_changes(
        zero_optimization__offload_optimizer={"device": "cpu"}, zero_optimization__reduce_bucket_size=1000,
        zero_optimization__stage3_prefetch_bucket_size=0, activation_checkpointing__cpu_checkpointing=True,
        steps_per_print=10, wall_clock_breakdown=True))
    assert training == []
    assert placement == ['activation_checkpointing.cpu_checkpointing: (absent) -> true',
                         'steps_per_print: 1000000000 -> 10', 'wall_clock_breakdown: false -> true',
                         'zero_optimization.offload_optimizer.device: (absent) -> "cpu"',
                         'zero_optimization.reduce_bucket_size: 500000 -> 1000',
                         'zero_optimization.stage3_prefetch_bucket_size: 500000 -> 0']
    training, placement = differences(ZERO3, with_changes(
        bf16__enabled=True, optimizer__params__betas=[0.9, 0.999], zero_optimization__stage=2,
        zero_optimization__zero_quantized_weights=True))
    assert training == ["bf16.enabled: false -> true", "optimizer.params.betas: [0.9, 0.95] -> [0.9, 0.999]",
                        "zero_optimization.stage: 3 -> 2", "zero_optimization.zero_quantized_weights: (absent) -> true"]
    assert placement == []
    # The experiment file sets these whatever the JSON says (training.load_ds_config).
    assert differences(ZERO3, with_changes(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=4,
                                           gradient_clipping=0.5, optimizer__params__lr=1.0)) == ([], [])


def stage_dir(tmp_path: Path, frozen: dict | None) -> Path:
    folder = tmp_path / "run" / "mask_learn"
    folder.mkdir(parents=True)
    if frozen is not None:
        frozen_path(folder).write_text(json.dumps(frozen))
    return folder


def test_a_fresh_start_reads_the_file(tmp_path: Path) -> None:
    settled = settle("mask_learn", stage_dir(tmp_path, None), str(REPO / CPU))
    assert (settled.ds, settled.notes, settled.refusal) == (ZERO3, [], "")


def test_a_resume_takes_the_copy_when_the_file_is_gone_and_placement_changes_from_the_file(tmp_path: Path) -> None:
    frozen = with_changes(bf16__enabled=True)
    folder = stage_dir(tmp_path, frozen)
    gone = settle("mask_learn", folder, str(tmp_path / "gone.json"))
    assert gone.ds == frozen and gone.refusal == ""
    assert gone.notes == [f"mask_learn: ds_config {tmp_path}/gone.json: not found; use one of ds_configs/*.json; "
                          f"resuming with the copy frozen when the stage started, {frozen_path(folder)}"]
    offload = with_changes(bf16__enabled=True, zero_optimization__offload_param={"device": "cpu"})
    (tmp_path / "offload.json").write_text(json.dumps(offload))
    moved = settle("mask_learn", folder, str(tmp_path / "offload.json"))
    assert moved.ds == offload and moved.refusal == ""
    assert moved.notes == ["mask_learn: resuming with the ds_config's new placement "
                           '(zero_optimization.offload_param.device: (absent) -> "cpu")']


def test_a_resume_under_other_numbers_is_refused_and_force_starts_the_stage_over(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    cfg = ExperimentConfig()
    cfg.mask_learn.ds_config = str(REPO / CPU)
    run.write_config(cfg)
    for stage in ("prepare", "tokenize"):
        run.mark_running(stage, cfg)
        run.mark_done(stage, {})
    run.save_state(StageState(stage="mask_learn", status="running", attempts=1))
    frozen_path(run.stage_dir("mask_learn")).write_text(json.dumps(with_changes(bf16__enabled=True)))

    decision = plan(run, cfg, force=False)[2]
    assert (decision.stage, decision.action, decision.changes) == ("mask_learn", "refuse", ())
    assert decision.reason.startswith(f"ds_config {REPO / CPU} changed since the stage started "
                                      "(bf16.enabled: true -> false)")
    decision = plan(run, cfg, force=True)[2]
    assert (decision.action, decision.reason) == ("run", "ds_config changed (--force)")  # not "resume": cleared

    frozen_path(run.stage_dir("mask_learn")).write_text(json.dumps(ZERO3))
    assert [(d.action, d.reason) for d in plan(run, cfg, force=False)[2:4]] == [("run", "resume"), ("run", "new")]


def test_the_stage_freezes_its_file_and_resumes_from_the_copy(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    cfg = ExperimentConfig()
    own = tmp_path / "ds.json"
    own.write_text(json.dumps(ZERO3))
    cfg.continued_pretrain.ds_config = str(own)
    run.write_config(cfg)

    stage = StageRun("continued_pretrain", run.root)
    first = stage.ds_config(cfg.continued_pretrain)
    assert json.loads(frozen_path(stage.dir).read_text()) == ZERO3
    assert first["train_micro_batch_size_per_gpu"] == cfg.continued_pretrain.train.micro_batch_size
    assert first["optimizer"]["params"]["lr"] == cfg.continued_pretrain.train.lr
    stage.lock.release()

    own.unlink()  # the resume finds the copy
    stage = StageRun("continued_pretrain", run.root)
    assert stage.ds_config(cfg.continued_pretrain) == first
    stage.lock.release()

    own.write_text(json.dumps(with_changes(fp16__enabled=True)))
    stage = StageRun("continued_pretrain", run.root)
    with pytest.raises(ValueError, match="fp16.enabled: false -> true"):
        stage.ds_config(cfg.continued_pretrain)
    stage.lock.release()
    assert json.loads(frozen_path(stage.dir).read_text()) == ZERO3

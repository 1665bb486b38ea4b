"""`maskprune clean`: removes the training checkpoints no stage reads again (at 70B about a terabyte
each), keeps continued_pretrain's final one unless --final, refuses --final before export has read
it, never touches another run's folders, and afterwards an export re-run is refused with the way out."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO, run_with_checkpoints
from maskprune.cli import main
from maskprune.config import load_config
from maskprune.rundir import STAGES, RunDir, plan


def clean(run: RunDir, *flags: str) -> int:
    return main(["clean", str(run.root), *flags])


def test_clean_keeps_the_final_checkpoint_and_lists_what_it_removed(tmp_path: Path, capsys) -> None:
    run = run_with_checkpoints(tmp_path)
    cpt_root = run.stage_dir("continued_pretrain") / "checkpoints"
    assert clean(run, "--dry-run") == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [f"[maskprune] mask_learn: would remove {run.stage_dir('mask_learn') / 'checkpoints'} (0.00 GiB)",
                      f"[maskprune] continued_pretrain: would remove {cpt_root / 'step00000010'} (0.00 GiB)",
                      f"[maskprune] continued_pretrain: would remove {cpt_root / 'universal' / 'step00000010'} "
                      "(0.00 GiB)",
                      "[maskprune] would remove 3 checkpoint folder(s), 0.00 GiB"]
    assert (cpt_root / "step00000010").is_dir() and (run.stage_dir("mask_learn") / "checkpoints").is_dir()
    assert clean(run) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "[maskprune] removed 3 checkpoint folder(s), 0.00 GiB"
    assert not (run.stage_dir("mask_learn") / "checkpoints").exists()
    assert sorted(p.name for p in cpt_root.iterdir()) == ["latest", "step00000020", "universal"]
    assert (cpt_root / "step00000020" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").stat().st_size == 3000
    # The final checkpoint is still there: a re-export is allowed.
    cfg = load_config(REPO / "configs" / "tiny.toml", ["export.shard_size_mb=100"])
    assert {d.stage: d.action for d in plan(run, cfg, force=True)}["export"] == "run"
    assert clean(run) == 0 and "no checkpoint to remove" in capsys.readouterr().out


def test_clean_final_is_refused_before_export_and_then_blocks_a_re_export(tmp_path: Path, capsys) -> None:
    run = run_with_checkpoints(tmp_path, until="continued_pretrain")
    cpt_root = run.stage_dir("continued_pretrain") / "checkpoints"
    assert clean(run, "--final") == 2
    assert capsys.readouterr().err.strip() == (
        "maskprune: error: clean --final: export has not been written from continued_pretrain's final "
        f"checkpoint ({cpt_root / 'step00000020'}) yet; run the pipeline to the end first, or clean without --final")
    assert (cpt_root / "step00000010").is_dir() and (run.stage_dir("mask_learn") / "checkpoints").is_dir()

    run = run_with_checkpoints(tmp_path / "done")
    cpt_root = run.stage_dir("continued_pretrain") / "checkpoints"
    assert clean(run, "--final") == 0
    assert not cpt_root.exists() and run.stage_dir("continued_pretrain").is_dir()
    cfg = load_config(REPO / "configs" / "tiny.toml", ["export.shard_size_mb=100"])
    export = {d.stage: d for d in plan(run, cfg, force=True)}["export"]
    assert (export.action, export.reason) == (
        "refuse", "continued_pretrain's final checkpoint, which export reads, was removed by `maskprune clean "
        f"--final`; re-run it first: maskprune reset {run.root} continued_pretrain")
    # The command line says why, not that a config changed (a benchmark re-running with --force met that).
    assert main(["run", str(REPO / "configs" / "tiny.toml"), "--run-dir", str(run.root), "--set",
                 "export.shard_size_mb=100", "--force"]) == 2
    assert capsys.readouterr().err.strip() == f"maskprune: error: {run.root}: export: {export.reason}"
    # Once continued_pretrain runs again, export may follow it.
    run.reset("continued_pretrain")
    assert {d.stage: d.action for d in plan(run, cfg, force=True)}["export"] == "run"


def test_clean_leaves_folders_of_another_run_alone(tmp_path: Path, capsys) -> None:
    """A benchmark's copied run dir reads its finished continued_pretrain from the source run."""
    source = run_with_checkpoints(tmp_path / "source")
    copy = RunDir(tmp_path / "copy")
    copy.write_config(load_config(REPO / "configs" / "tiny.toml"))
    for stage in STAGES:
        state = source.state(stage)
        copy.save_state(state)
    assert clean(copy, "--final") == 0
    assert capsys.readouterr().out.strip() == "[maskprune] no checkpoint to remove (an unfinished stage keeps " \
        "its checkpoints to resume from)"
    assert (source.stage_dir("continued_pretrain") / "checkpoints" / "step00000010").is_dir()


def test_clean_on_a_folder_that_is_not_a_run_directory_says_so(tmp_path: Path, capsys) -> None:
    assert main(["clean", str(tmp_path)]) == 2
    assert "maskprune: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["clean"])

"""`maskprune report`: report.md + PNGs + stdout summary, on a synthetic run directory (fast) and on
a real short pipeline run (slow)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import REPO, run_cli
from maskprune.cli import main
from maskprune.config import load_config
from maskprune.masks_io import KeepIndices, save_keep_indices
from maskprune.rundir import RunDir

SOURCE = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_size": 64,
          "intermediate_size": 600, "num_hidden_layers": 3}  # 600 > 256 columns: the heatmap bins
FINAL = {**SOURCE, "num_attention_heads": 2, "intermediate_size": 200}
PARAMS = (1_234_567, 765_432)
PPL = {"dense": (10.123, 11.234), "pruned": (20.456, 21.567), "pruned+cpt": (12.789, 13.891)}


def _new_run(root: Path) -> RunDir:
    run = RunDir(root)
    run.write_config(load_config(REPO / "configs" / "tiny.toml"))
    model = root / "prepare" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(SOURCE))
    run.mark_done("prepare", {"model": str(model)})
    return run


def _full_run(root: Path) -> RunDir:
    """Every stage's recorded outputs, written by hand in the formats the stages write."""
    from torch.utils.tensorboard import SummaryWriter

    run = _new_run(root)
    run.mark_done("tokenize", {"data": str(root / "tokenize")})
    keep = KeepIndices(q_heads=torch.tensor([[0, 2], [1, 3], [0, 3]]), kv_heads=torch.tensor([[0, 1]] * 3),
                       ffn=torch.stack([torch.randperm(600)[:200].sort().values for _ in range(3)]),
                       method="maskprune", attn_mode="query_per_group")
    (root / "mask_learn").mkdir()
    save_keep_indices(root / "mask_learn" / "masks.safetensors", keep)
    for stage, tags in (("mask_learn", ("loss/ce", "loss/total", "target_dims/attn", "target_dims/ffn",
                                        "dual/z", "dual/y_attn_mean", "dual/y_ffn_mean",
                                        "sparsity/params_ratio", "sparsity/budget_ratio")),
                        ("continued_pretrain", ("loss/train", "loss/ce"))):
        writer = SummaryWriter(str(run.tb_dir(stage)))
        for step in range(1, 6):
            for tag in tags:
                writer.add_scalar(tag, 1.0 / step, step)
        writer.add_scalar("loss/valid", 0.5, 5)
        writer.close()
    writer = SummaryWriter(str(run.tb_dir("continued_pretrain")))
    for step in (3, 5):
        for tag in ("loss/dev_ppl/britannica_dev", "loss/dev_ppl/milton_dev", "loss/dev_ppl_geomean"):
            writer.add_scalar(tag, 100.0 / step, step)
    writer.close()
    run.mark_done("mask_learn", {"masks": str(root / "mask_learn" / "masks.safetensors")})
    model = root / "hard_prune" / "model"
    model.mkdir(parents=True)
    (model / "prune_report.json").write_text(json.dumps(
        {"config": FINAL, "params_before": PARAMS[0], "params_after": PARAMS[1]}))
    run.mark_done("hard_prune", {"model": str(model), "report": str(model / "prune_report.json")})
    run.mark_done("continued_pretrain", {"checkpoints": str(root / "continued_pretrain" / "checkpoints"),
                                         "final_tag": "step00000005"})
    run.mark_done("export", {"model": str(root / "export" / "model")})
    results = {"models": {name: {"ppl": {"eval_text": {"128": {"ppl": a}, "2048": {"ppl": b}}},
                                 "heldout": {"geomean": {"128": a + 20, "2048": b + 20}}}
                          for name, (a, b) in PPL.items()}}
    (root / "evaluate").mkdir(exist_ok=True)
    (root / "evaluate" / "results.json").write_text(json.dumps(results))
    table = "\n".join(f"| ppl eval_text @128 | {a:.3f} |" for a, _ in PPL.values())
    (root / "evaluate" / "results.md").write_text(f"# Evaluation\n\n| | x |\n|---|---|\n{table}\n")
    run.mark_done("evaluate", {"results": str(root / "evaluate" / "results.json")})
    return run


def _check_pngs(root: Path, md: str) -> list[str]:
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    for rel in images:
        with Image.open(root / rel) as image:
            assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
    return images


def test_report_full_synthetic_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _full_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "report.md").read_text()
    assert "| FFN channels | 600 | 200 |" in md and "| query heads | 4 | 2 |" in md
    assert f"| parameters | {PARAMS[0]:,} | {PARAMS[1]:,} |" in md
    assert all(f"{a:.3f}" in md for a, _ in PPL.values())
    images = _check_pngs(tmp_path, md)
    assert {"report/loss_mask_learn.png", "report/loss_continued_pretrain.png", "report/kept_units.png",
            "report/mask_learn_dynamics.png", "report/mask_learn_sparsity.png",
            "report/dev_continued_pretrain.png"} <= set(images)
    assert "report/dev_mask_learn.png" not in images  # no dev texts there: no empty panel
    assert f"{PARAMS[0]:,} -> {PARAMS[1]:,} (38.0% removed)" in out
    assert "query heads 4 -> 2, KV heads 2 -> 2, FFN channels 600 -> 200" in out
    assert "eval_text @128: 10.12 (dense) -> 20.46 (pruned) -> 12.79 (pruned+cpt)" in out
    assert "eval_text @2048: 11.23 (dense)" in out
    assert "held-out geomean @128: 30.12 (dense) -> 40.46 (pruned) -> 32.79 (pruned+cpt)" in out
    assert str(tmp_path / "export" / "model") in out and str(tmp_path / "report.md") in out


def test_report_partial_run_lists_missing_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _new_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "report.md").read_text()
    missing = "tokenize, mask_learn, hard_prune, continued_pretrain, export, evaluate"
    assert f"Not done: {missing}." in md and f"stages not done: {missing}" in out
    assert "the evaluate stage is not done" in md and "| FFN channels | 600 | - |" in md
    assert _check_pngs(tmp_path, md) == []


def test_report_refuses_a_non_run_directory(tmp_path: Path) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert not (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_report_on_a_real_short_run(tmp_path: Path) -> None:
    run_cli("run", "configs/tiny.toml", "--run-dir", str(tmp_path), "--set", "mask_learn.train.steps=6",
            "--set", "continued_pretrain.train.steps=4", "--set", "mask_learn.train.checkpoint_every=3",
            "--set", "continued_pretrain.train.checkpoint_every=2", "--set", "mask_learn.train.eval_every=3",
            "--set", "continued_pretrain.train.eval_every=2", "--set", "mask_learn.budget_warmup_fraction=0.33",
            "--set", "mask_learn.train.warmup_steps=2", "--set", "continued_pretrain.train.warmup_steps=2")
    out = run_cli("report", str(tmp_path)).stdout
    md = (tmp_path / "report.md").read_text()
    report = json.loads((tmp_path / "hard_prune" / "model" / "prune_report.json").read_text())
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    assert f"{report['params_before']:,} -> {report['params_after']:,}" in out
    assert f"| FFN channels | 192 | {report['config']['intermediate_size']} |" in md
    for model in results["models"].values():
        assert f"{model['ppl']['eval_text']['128']['ppl']:.3f}" in md
    assert len(_check_pngs(tmp_path, md)) == 5

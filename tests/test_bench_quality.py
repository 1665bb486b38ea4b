"""benchmarks/bench_quality.py: equal training budgets planned before anything trains, the held-out
tables, the verdict naming every metric a baseline wins, and issue 13's goal line."""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_with_checkpoints
from maskprune.config import load_config
from maskprune.rundir import STAGES, plan


def bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_every_method_and_the_dense_reference_train_on_the_same_tokens() -> None:
    bench = bench_quality()
    cfg = load_config(REPO / "configs" / "demo.toml")
    plans = bench.budget_plan(cfg, bench.METHODS, mask_steps=40, cpt_steps=20)
    assert [p.name for p in plans] == bench.METHODS + [bench.DENSE_TRAINED]
    per_step = 2 * 1 * 2 * 128  # demo: micro-batch 2, grad_accum 1, 2 ranks, 128-token sequences
    assert {p.train_tokens for p in plans} == {60 * per_step}
    by_name = {p.name: p for p in plans}
    assert (by_name["maskprune"].mask_steps, by_name["maskprune"].recovery_steps) == (40, 20)
    for name in ("wanda_sp", "flap", bench.DENSE_TRAINED):  # mask-learn's tokens as extra recovery steps
        assert (by_name[name].mask_steps, by_name[name].recovery_steps) == (0, 60)
    # What each run is told: the baselines recover 60 steps at MaskPrune's shape; the dense reference
    # keeps the source shape (9 heads, FFN 1536) and evaluates only its trained model.
    mode = bench.MODES["standard"]
    shape = {"num_attention_heads": 6, "intermediate_size": 512}
    flap = bench.run_overrides(by_name["flap"], mode, 0.5, shape)
    assert "continued_pretrain.train.steps=60" in flap and "mask_learn.method=flap" in flap
    assert "target.arch.intermediate_size=512" in flap
    dense = bench.run_overrides(by_name[bench.DENSE_TRAINED], mode, 0.5,
                                {"num_attention_heads": 9, "intermediate_size": 1536})
    assert 'evaluate.models=["pruned+cpt"]' in dense and "target.arch.num_attention_heads=9" in dense
    assert "mask_learn.train.steps=40" in bench.run_overrides(by_name["maskprune"], mode, 0.5, None)
    # The ablation: MaskPrune's own stage and budget, masks frozen from step 0, cut to MaskPrune's shape.
    assert (by_name[bench.FROZEN].method, by_name[bench.FROZEN].mask_steps, by_name[bench.FROZEN].recovery_steps) \
        == ("maskprune", 40, 20)
    frozen = bench.run_overrides(by_name[bench.FROZEN], mode, 0.5, shape)
    assert {"mask_learn.train.steps=40", "continued_pretrain.train.steps=20", "mask_learn.hardening_fraction=1.0",
            "target.arch.num_attention_heads=6", "target.arch.intermediate_size=512"} <= set(frozen)
    assert not any(o.startswith("mask_learn.method=") for o in frozen)
    assert load_config(REPO / "configs" / "demo.toml", frozen).mask_learn.hardening_fraction == 1.0
    # The dense reference's run is the same whatever sparsities are benchmarked, so its cache serves
    # a `--sparsity 0.5` rerun too.
    source = {"num_attention_heads": 9, "intermediate_size": 1536, "hidden_size": 576}
    reference = bench.dense_overrides(cfg, by_name[bench.DENSE_TRAINED], mode, source, [])
    assert reference == bench.dense_overrides(cfg, by_name[bench.DENSE_TRAINED], {**mode, "sparsity": [0.5]},
                                              source, [])
    assert "target.sparsity=0.3" in reference and "target.arch.intermediate_size=1536" in reference
    # --seed reaches both training stages of every run (the default 0 is each stage's own default).
    seeded = {**mode, "seed": 1}
    for plan, run_shape in ((by_name["maskprune"], None), (by_name["flap"], shape), (by_name[bench.DENSE_TRAINED], shape)):
        assert {"mask_learn.train.seed=1", "continued_pretrain.train.seed=1"} <= set(
            bench.run_overrides(plan, seeded, 0.5, run_shape))
    assert "continued_pretrain.train.seed=0" in flap
    # Candidate recovery rates: the config's own rate keeps the plain run dir (a single-rate bench's
    # cache), comes first (the others copy its finished stages), and is not run twice.
    assert bench.rate_runs("s50_flap", [5e-5, 2e-4, 5e-5], 2e-4) == {2e-4: "s50_flap", 5e-5: "s50_flap_cptlr5e-05"}
    assert bench.rate_runs("s50_flap", [], 2e-4) == {2e-4: "s50_flap"}
    assert bench.rate_runs("s50_flap", [1e-4], 2e-4) == {1e-4: "s50_flap_cptlr0.0001"}
    # A candidate is scored on the dev texts only: at the training length, without the held-out
    # texts or the zero-shot suite, so choosing a rate never looks at what the tables report.
    dev = bench.dev_overrides([*flap, "continued_pretrain.train.lr=5e-05"], 128)
    assert dev[:len(flap) + 1] == [*flap, "continued_pretrain.train.lr=5e-05"]
    assert dev[len(flap) + 1:] == [
        'evaluate.heldout_texts=[{kind = "corpus", path = "britannica", split = "dev"}, {kind = "corpus", '
        'path = "milton", split = "dev"}, {kind = "corpus", path = "pytest_docs", split = "dev"}]',
        "evaluate.tasks=[]", 'evaluate.models=["pruned+cpt"]', "evaluate.heldout_tokens=6144",
        "evaluate.ppl_chunk_lengths=[128]", "evaluate.eval_text_max_tokens=256"]
    scored = load_config(REPO / "configs" / "demo.toml", dev)  # the demo's own held-out texts replaced
    assert [t.path for t in scored.evaluate.heldout_texts] == ["britannica", "milton", "pytest_docs"]
    assert (scored.continued_pretrain.train.lr, scored.evaluate.tasks) == (5e-5, [])
    # Stages that train different tokens per step cannot be made equal by whole steps: refused.
    cfg.continued_pretrain.train.micro_batch_size = 3
    with pytest.raises(ValueError, match="not a whole number of recovery steps"):
        bench.budget_plan(cfg, ["maskprune", "flap"], mask_steps=40, cpt_steps=20)


def result(heldout_before: float, heldout_after: float, ppl_before: float, ppl_after: float, acc: float) -> dict:
    def one(held: float, ppl: float) -> dict:
        return {"ppl": {"128": ppl}, "heldout": {"128": held}, "heldout_texts": {"sotu:heldout": {"128": held}},
                "acc": {"boolq": acc}, "mean_acc": acc}

    return {"one_shot": one(heldout_before, ppl_before), "recovered": one(heldout_after, ppl_after)}


def report(bench) -> dict:
    dense = result(30.0, 30.0, 100.0, 100.0, 0.5)["recovered"]
    trained = result(25.0, 25.0, 90.0, 90.0, 0.5)["recovered"]
    budget = {m: {"mask_steps": 0, "recovery_steps": 60, "train_tokens": 30720}
              for m in ("maskprune", "wanda_sp", "random", bench.DENSE_TRAINED)}
    return {"mode": "standard", "config": "configs/demo.toml", "settings": bench.MODES["standard"],
            "dense": dense, "dense_trained": trained, "budget": budget,
            "targets": {"50%": {"shape": {"num_attention_heads": 6, "num_key_value_heads": 3,
                                          "intermediate_size": 640},
                                "params": {"final": 1},
                                "methods": {"maskprune": result(120.0, 60.0, 150.0, 120.0, 0.40),
                                            "wanda_sp": result(150.0, 50.0, 140.0, 125.0, 0.45),
                                            "random": result(900.0, 300.0, 900.0, 300.0, 0.30)}}}}


def test_verdict_names_each_metric_a_baseline_wins_and_the_goal() -> None:
    bench = bench_quality()
    rep = report(bench)
    assert bench.not_best(rep, ["128"]) == [
        "at 50%: wanda_sp beats MaskPrune on held-out geomean ppl@128 recovered (50.000 vs 60.000)",
        "at 50%: wanda_sp beats MaskPrune on PTB ppl@128 before recovery (140.000 vs 150.000)",
        "at 50%: wanda_sp beats MaskPrune on mean zero-shot acc after recovery (0.450 vs 0.400)"]
    assert bench.goal(rep, ["128"]) == [
        "at 50%, held-out geomean @128, after mask-learn vs one-shot: MaskPrune 120.00 vs best baseline "
        "wanda_sp 150.00 = 0.800x (meets the <= 0.90x goal)",
        "at 50%, held-out geomean @128, after recovery: MaskPrune 60.00 vs best baseline wanda_sp 50.00 = "
        "1.200x (MISSES the <= 0.90x goal)",
        "at 50%, held-out geomean @128: MaskPrune after recovery is 2.40x the equal-budget dense reference "
        "(60.00 vs 25.00)"]
    table = bench.markdown(rep, ["128"])
    # held-out: value, x dense, x equal-budget dense, before and after recovery
    assert "| maskprune | 30,720 | 120.00 | 4.00x | 4.80x | 60.00 | 2.00x | 2.40x |" in table
    assert "| dense, trained (equal budget) | 30,720 | - | - | - | 25.00 | 0.83x | 1.00x |" in table
    # PTB before / after, then boolq and the six tasks this report lacks, then the mean
    assert "| random | 900.00 | 300.00 | 0.300 | - | - | - | - | - | - | 0.300 |" in table
    assert "always the answer most often right (no model)" not in table  # reports from before it was kept
    rep["zero_shot_majority"] = {"boolq": 0.7, "piqa": 0.54}
    assert "| always the answer most often right (no model) | - | - | 0.700 | 0.540 | - | - | - | - | - | 0.620 |" \
        in bench.markdown(rep, ["128"])
    # which baselines ran is part of the result: a table without FLAP must not read as "FLAP lost"
    assert "- baselines: wanda_sp, random; not run here: maskprune_frozen, flap, taylor, magnitude (`--methods`)" in table
    assert "- bias compensation (removed channels' means folded into o_proj / down_proj biases): none; " \
        "MaskPrune's `mask_learn.bias_compensation` is off" in table
    assert "- least-squares refit of the kept columns when the masks harden (`mask_learn.reconstruction`): off\n" in table
    assert "learning rates" not in table  # reports written before the rates were recorded
    rep["learning_rates"] = {"mask_learn": 2e-3, "lora_rank": 64, "recovery": 2e-4}
    one_rate = bench.markdown(rep, ["128"])
    assert "- learning rates: MaskPrune's mask-learn LoRA (rank 64) 0.002; recovery, every model 0.0002\n" in one_rate
    assert "chosen per model" not in one_rate
    # Recovery rates chosen per model on the dev texts: the rule and every model's dev scores are shown.
    rep["learning_rates"] = {"mask_learn": 2e-3, "lora_rank": 64, "recovery_grid": [5e-5, 2e-4],
                             "dev_texts": ["britannica:dev", "milton:dev", "pytest_docs:dev"],
                             "dev_length": 128, "dev_tokens": 6144}
    rep["dense_trained_recovery_lr"] = {"chosen": 5e-5, "dev": {"5e-05": 40.0, "0.0002": 41.5}}
    for method, chosen, dev in (("maskprune", 5e-5, (70.0, 72.0)), ("wanda_sp", 2e-4, (66.0, 64.0)),
                                ("random", 2e-4, (500.0, 400.0))):
        rep["targets"]["50%"]["methods"][method]["recovery_lr"] = {"chosen": chosen,
                                                                    "dev": {"5e-05": dev[0], "0.0002": dev[1]}}
    per_model = bench.markdown(rep, ["128"])
    assert "; recovery, per model the rate of {5e-05, 0.0002} with the lowest dev geomean ppl@128 " \
        "(britannica:dev, milton:dev, pytest_docs:dev; 6,144 tokens each; no stage trains on them, " \
        "no table here reports them)\n" in per_model
    assert "| model | dev ppl@128, lr 5e-05 | dev ppl@128, lr 0.0002 | recovery lr kept |" in per_model
    assert "| dense, trained (equal budget) | 40.00 | 41.50 | 5e-05 |" in per_model
    assert "| wanda_sp | 66.00 | 64.00 | 0.0002 |" in per_model
    rep["bias_compensation"] = True
    assert "biases): MaskPrune\n" in bench.markdown(rep, ["128"])
    rep["reconstruction"] = 0.01
    assert "(`mask_learn.reconstruction`): MaskPrune, damping 0.01\n" in bench.markdown(rep, ["128"])
    rep["reconstruction"] = 0.0  # plain least squares is on, not off
    assert "(`mask_learn.reconstruction`): MaskPrune, damping 0\n" in bench.markdown(rep, ["128"])
    rep["reconstruction"] = False
    assert "(`mask_learn.reconstruction`): off\n" in bench.markdown(rep, ["128"])
    assert "- calibration:" not in bench.markdown(rep, ["128"])  # reports written before it was recorded
    rep["calibration_batches"] = 16
    assert "- calibration: MaskPrune and the one-shot baselines read at most the first 16 global batches of " \
        "the training stream besides training (the baselines' scores; MaskPrune's start)\n" in bench.markdown(rep, ["128"])
    # The learner's ablation is not a one-shot baseline: the goal's "best baseline" leaves it out, and it
    # gets lines of its own; a metric it wins is listed like any baseline's.
    rep["budget"][bench.FROZEN] = rep["budget"]["maskprune"]
    rep["targets"]["50%"]["methods"][bench.FROZEN] = {**result(110.0, 55.0, 150.0, 120.0, 0.40),
                                                      "recovery_lr": {"chosen": 5e-5, "dev": {"5e-05": 69.0}}}
    lines = bench.goal(rep, ["128"])
    assert lines[:2] == bench.goal(report(bench), ["128"])[:2]
    assert lines[2:4] == [
        "at 50%, held-out geomean @128, after mask-learn: MaskPrune 120.00 vs its masks frozen at the Wanda-sp "
        "start 110.00 = 1.091x",
        "at 50%, held-out geomean @128, after recovery: MaskPrune 60.00 vs its masks frozen at the Wanda-sp "
        "start 55.00 = 1.091x"]
    assert "at 50%: maskprune_frozen beats MaskPrune on held-out geomean ppl@128 recovered (55.000 vs 60.000)" \
        in bench.not_best(rep, ["128"])
    assert "- maskprune_frozen: the learner's ablation, MaskPrune's mask-learn with its masks frozen at their " \
        "Wanda-sp start (`mask_learn.hardening_fraction = 1`)" in bench.markdown(rep, ["128"])


def test_a_zero_shot_loss_says_whether_it_clears_the_noise() -> None:
    """At 100 questions per task a 7-task mean moves 0.0014 per question: a loss is listed with the
    standard error of the difference, paired question by question where both runs kept their answers."""
    bench = bench_quality()
    rep = report(bench)
    methods = rep["targets"]["50%"]["methods"]
    ours, theirs = methods["maskprune"]["recovered"], methods["wanda_sp"]["recovered"]
    # 20 questions; wanda_sp right on 9 (0.45), MaskPrune on 8 (0.40): the 8 shared, one more of its own
    ours["zero_shot"] = {"boolq": {"acc": 0.40, "n": 20, "outcomes": {"acc": "1" * 8 + "0" * 12}}}
    theirs["zero_shot"] = {"boolq": {"acc": 0.45, "n": 20, "outcomes": {"acc": "1" * 9 + "0" * 11}}}
    ours["mean_acc_se"], theirs["mean_acc_se"] = 0.112, 0.114
    paired = math.sqrt((0.05 ** 2 * 19 + 0.95 ** 2) / 19 / 20)  # differences: nineteen 0, one -1
    loss = "at 50%: wanda_sp beats MaskPrune on mean zero-shot acc after recovery (0.450 vs 0.400)"
    assert f"{loss}; within 2 standard errors of the difference (paired: {paired:.3f})" in bench.not_best(rep, ["128"])
    # Seed means and reports from before the answers were kept: the means' own errors, combined.
    del ours["zero_shot"]
    assert f"{loss}; within 2 standard errors of the difference (unpaired, an overestimate: " \
        f"{math.hypot(0.112, 0.114):.3f})" in bench.not_best(rep, ["128"])
    # Every question wanda_sp gets right and MaskPrune wrong: a loss beyond the noise.
    ours["zero_shot"] = {"boolq": {"acc": 0.0, "n": 20, "outcomes": {"acc": "0" * 20}}}
    theirs["zero_shot"] = {"boolq": {"acc": 1.0, "n": 20, "outcomes": {"acc": "1" * 20}}}
    assert f"{loss}; beyond 2 standard errors of the difference (paired: 0.000)" in bench.not_best(rep, ["128"])
    assert "| maskprune | 150.00 | 120.00 | 0.400 | - | - | - | - | - | - | 0.400 ± 0.112 |" in bench.markdown(rep, ["128"])
    assert bench.mean_row([ours, theirs])["mean_acc_se"] == pytest.approx(0.113)  # same questions: averaged
    # A row read from an evaluate report keeps the tasks' verdicts and the mean's standard error.
    tasks = {"boolq": {"acc": 0.5, "acc_norm": 0.5, "n": 5, "outcomes": {"acc": "11000", "acc_norm": "10100"}},
             "piqa": {"acc": 0.2, "acc_norm": 0.2, "n": 5, "outcomes": {"acc": "00001", "acc_norm": "00001"}}}
    model = {"params": 1, "ppl": {"eval_text": {"128": {"ppl": 9.0}}}, "heldout": None, "zero_shot": tasks}
    read = bench.row({"models": {"pruned": model}}, "pruned")
    assert (read["mean_acc"], read["mean_acc_se"]) == (0.35, math.sqrt(0.0625 + 0.04) / 2)
    assert read["zero_shot"] == tasks and read["acc"] == {"boolq": 0.5, "piqa": 0.2}


def test_a_run_exported_loses_its_checkpoints_and_a_rerun_of_the_bench_still_skips_it(tmp_path: Path) -> None:
    bench = bench_quality()
    run = run_with_checkpoints(tmp_path)  # every stage done: trained, exported, evaluated
    bench.free_checkpoints(run.root)
    assert not (run.stage_dir("mask_learn") / "checkpoints").exists()
    assert not (run.stage_dir("continued_pretrain") / "checkpoints").exists()
    # The bench reruns every run with --force: with the checkpoints gone nothing re-runs or is refused
    # (an export re-run would be), and freeing an already freed run is not an error.
    cfg = load_config(REPO / "configs" / "tiny.toml")
    assert [(d.stage, d.action) for d in plan(run, cfg, force=True)] == [(s, "skip") for s in STAGES]
    bench.free_checkpoints(run.root)


def test_dev_scores_stay_in_bench_dev_json_and_never_in_the_runs_evaluate_results(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    bench = bench_quality()
    run = run_with_checkpoints(tmp_path)
    scores = {"geomean": {"128": 150.0}, "texts": {}}

    def evaluate_dev_texts(config: str, run_dir: Path, overrides: list[str], *extra: str, threads: int = 1) -> None:
        assert extra == ("--only", "evaluate", "--force")  # what the pipeline writes, as it writes it
        (run_dir / "evaluate").mkdir(exist_ok=True)
        (run_dir / "evaluate" / "results.json").write_text(json.dumps({"models": {"pruned+cpt": {"heldout": scores}}}))

    monkeypatch.setattr(bench, "maskprune_cli", evaluate_dev_texts)
    args = argparse.Namespace(config="configs/tiny.toml", eval_threads=1)
    assert bench.dev_score(args, run.root, ["x=1"]) == scores
    assert json.loads((run.root / "bench_dev.json").read_text())["heldout"] == scores
    assert not (run.root / "evaluate" / "results.json").exists() and run.state("evaluate").status == "pending"
    assert run.state("export").status == "done"


def test_the_baselines_calibrate_on_as_much_text_as_the_refit_reads() -> None:
    """With mask_learn.reconstruction MaskPrune reads reconstruction_batches (16) global batches of
    training text, the one-shot baselines calibration_batches (8): FLAP with 4x the calibration text
    measured 2-6 % lower perplexity, so the benchmark gives the baselines the refit's count (and leaves
    MaskPrune, its ablation and the dense reference as the config sets them)."""
    bench = bench_quality()
    plain = load_config(REPO / "configs" / "demo.toml", ["mask_learn.reconstruction=false"])
    assert bench.calibration_batches(plain) == plain.mask_learn.calibration_batches == 8
    assert bench.calibration_batches(load_config(REPO / "configs" / "demo.toml")) == 32  # the demo refits
    refit = load_config(REPO / "configs" / "demo.toml", ["mask_learn.reconstruction=true",
                                                          "mask_learn.reconstruction_batches=32"])
    assert bench.calibration_batches(refit) == 32
    assert bench.calibration_batches(load_config(REPO / "configs" / "demo.toml", [
        "mask_learn.reconstruction=true", "mask_learn.reconstruction_batches=4"])) == 8  # the start reads more
    plans = {p.name: p for p in bench.budget_plan(refit, bench.METHODS, mask_steps=40, cpt_steps=20)}
    mode, shape = bench.MODES["standard"], {"num_attention_heads": 9, "intermediate_size": 1088}
    flap = bench.run_overrides(plans["flap"], mode, 0.2, shape, [], 32)
    assert "mask_learn.calibration_batches=32" in flap
    assert load_config(REPO / "configs" / "demo.toml", flap).mask_learn.calibration_batches == 32
    for name in ("maskprune", bench.FROZEN, bench.DENSE_TRAINED):
        overrides = bench.run_overrides(plans[name], mode, 0.2, shape, [], 32)
        assert not any(o.startswith("mask_learn.calibration_batches") for o in overrides), name
    # A config whose baselines already read as much is told nothing, so their cached runs still serve.
    assert not any(o.startswith("mask_learn.calibration_batches")
                   for o in bench.run_overrides(plans["flap"], mode, 0.2, shape, [], None))


def test_seeds_combine_into_one_report_by_geometric_mean_and_the_goal_is_shown_seed_by_seed(tmp_path: Path) -> None:
    """Seeds moved MaskPrune's held-out ppl by 2 % at 20 %, as much as the goal's margin there: a
    result is read over seeds, the mean against the goal and each seed's own ratio beside it."""
    bench = bench_quality()
    seed0, seed1 = report(bench), report(bench)
    seed1["settings"] = {**seed1["settings"], "seed": 1}
    seed1["targets"]["50%"]["methods"]["maskprune"] = seed1_maskprune = result(120.0, 40.0, 150.0, 120.0, 0.50)
    seed1["targets"]["50%"]["methods"]["wanda_sp"]["recovered"]["heldout"]["128"] = 40.0
    seed1["dense"]["heldout_texts"] = {"sotu": {"128": 30.0 * 4}}
    seed0["dense"]["heldout_texts"] = {"sotu": {"128": 30.0}}
    combined = bench.combine([seed0, seed1])
    assert combined["settings"]["seed"] == [0, 1]
    mp, wanda = (combined["targets"]["50%"]["methods"][m]["recovered"] for m in ("maskprune", "wanda_sp"))
    assert mp["heldout"]["128"] == pytest.approx((60.0 * 40.0) ** 0.5)  # geometric, not arithmetic
    assert wanda["heldout"]["128"] == pytest.approx((50.0 * 40.0) ** 0.5)
    assert mp["mean_acc"] == pytest.approx(0.45) and mp["acc"]["boolq"] == pytest.approx(0.45)
    assert combined["dense"]["heldout_texts"]["sotu"]["128"] == pytest.approx(60.0)
    assert seed1_maskprune["recovered"]["heldout"]["128"] == 40.0 and seed0["targets"]["50%"]["methods"][
        "maskprune"]["recovered"]["heldout"]["128"] == 60.0  # the seeds' own reports are left as they were
    assert bench.goal(combined, ["128"])[1] == (
        "at 50%, held-out geomean @128, after recovery: MaskPrune 48.99 vs best baseline wanda_sp 44.72 = "
        "1.095x (MISSES the <= 0.90x goal)")
    assert bench.seed_spread([seed0, seed1], ["128"]) == [
        "at 50%, held-out geomean @128, after mask-learn vs one-shot: seed 0 0.800x (wanda_sp), "
        "seed 1 0.800x (wanda_sp); 2 of 2 seeds meet the <= 0.90x goal",
        "at 50%, held-out geomean @128, after recovery: seed 0 1.200x (wanda_sp), seed 1 1.000x (wanda_sp); "
        "0 of 2 seeds meet the <= 0.90x goal"]
    assert "training seeds 0, 1, each a full run of every model; every figure is the geometric mean" \
        in bench.markdown(combined, ["128"])
    # Each seed's recovery-rate choice is listed; the dev scores are their geometric mean.
    for rep, chosen, dev in ((seed0, 5e-5, 64.0), (seed1, 2e-4, 100.0)):
        rep["learning_rates"] = {"mask_learn": 2e-3, "lora_rank": 64, "recovery_grid": [5e-5, 2e-4],
                                 "dev_texts": ["britannica:dev"], "dev_length": 128, "dev_tokens": 6144}
        rep["dense_trained_recovery_lr"] = {"chosen": 5e-5, "dev": {"5e-05": 40.0, "0.0002": 41.5}}
        for res in rep["targets"]["50%"]["methods"].values():
            res["recovery_lr"] = {"chosen": chosen, "dev": {"5e-05": dev, "0.0002": dev}}
    table = bench.markdown(bench.combine([seed0, seed1]), ["128"])
    assert "| wanda_sp | 80.00 | 80.00 | 5e-05, 0.0002 |" in table
    bench.write_combined([seed0, seed1], tmp_path, "demo_standard")
    written = json.loads((tmp_path / "quality_demo_standard_seeds0-1.json").read_text())
    assert written["goal"][1].endswith("= 1.095x (MISSES the <= 0.90x goal)")
    assert written["goal_per_seed"] == bench.seed_spread([seed0, seed1], ["128"])
    assert "## The goal seed by seed (each against that seed's best baseline)\n\n- at 50%, held-out geomean " \
        "@128, after mask-learn vs one-shot: seed 0 0.800x" in (tmp_path / "quality_demo_standard_seeds0-1.md").read_text()
    assert (tmp_path / "quality_demo_standard_seeds0-1.png").stat().st_size > 0
    # Report names: seed 0 keeps the plain name; an explicit --name at one seed is kept as given.
    assert bench.seed_names("demo_standard", False, [0, 1]) == {0: "demo_standard", 1: "demo_standard_seed1"}
    assert bench.seed_names("mine", True, [1]) == {1: "mine"}
    assert bench.seed_names("mine", True, [1, 2]) == {1: "mine_seed1", 2: "mine_seed2"}
    # Not one comparison: refused, naming what differs.
    with pytest.raises(ValueError, match="repeat a seed"):
        bench.combine([seed0, seed0])
    other_shape = copy.deepcopy(seed0)
    other_shape["settings"] = {**other_shape["settings"], "seed": 2}
    other_shape["targets"]["50%"]["shape"] = {**other_shape["targets"]["50%"]["shape"], "intermediate_size": 704}
    with pytest.raises(ValueError, match="at 50% seed 2 learned .*704.*cut to different shapes"):
        bench.combine([seed0, other_shape])
    other_budget = copy.deepcopy(seed0)
    other_budget["settings"] = {**other_budget["settings"], "seed": 3, "mask_steps": 12}
    with pytest.raises(ValueError, match="seed 3's report differs from seed 0's in settings: combine the seeds of one"):
        bench.combine([seed0, other_budget])

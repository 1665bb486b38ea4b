"""benchmarks/bench_quality.py's verdict: every metric on which a baseline beats MaskPrune is named."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from helpers import REPO


def bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(ppl_before: float, ppl_after: float, acc: float) -> dict:
    return {"one_shot": {"ppl": {"128": ppl_before}, "acc": {"boolq": acc}, "mean_acc": acc},
            "recovered": {"ppl": {"128": ppl_after}, "acc": {"boolq": acc}, "mean_acc": acc}}


def test_not_best_names_each_metric_a_baseline_wins(tmp_path: Path) -> None:
    bench = bench_quality()
    report = {"mode": "standard", "config": "configs/demo.toml", "settings": bench.MODES["standard"],
              "dense": {"ppl": {"128": 100.0}, "acc": {}, "mean_acc": 0.5},
              "targets": {"50%": {"shape": {"num_attention_heads": 6, "num_key_value_heads": 3,
                                            "intermediate_size": 640},
                                  "params": {"final": 1},
                                  "methods": {"maskprune": result(150.0, 120.0, 0.40),
                                              "wanda_sp": result(140.0, 125.0, 0.45),
                                              "random": result(900.0, 300.0, 0.30)}}}}
    found = bench.not_best(report, ["128"])
    assert found == ["at 50%: wanda_sp beats MaskPrune on PTB ppl@128 before recovery (140.000 vs 150.000)",
                     "at 50%: wanda_sp beats MaskPrune on mean zero-shot acc after recovery (0.450 vs 0.400)"]
    table = bench.markdown(report, ["128"])
    assert "| maskprune | 150.00 | 120.00 |" in table and "| random | 900.00 | 300.00 |" in table

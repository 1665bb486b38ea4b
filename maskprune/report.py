"""`maskprune report RUN`: RUN/report.md with PNG plots under RUN/report/, and a plain-text summary.

Reads only what the stages recorded (state.json outputs, summary / prune report / results files,
TensorBoard events), so it works on a partial run: missing stages are listed, their sections say so.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from maskprune.rundir import STAGES, RunDir, RunDirError, atomic_write_text

# (tag, legend) per panel; a panel or figure whose tags were never logged is left out.
Panel = tuple[str, list[tuple[str, str]]]
TRAIN_TAGS = (("loss/train", "train"), ("loss/total", "train (total)"), ("loss/ce", "train CE"))
MAX_COLUMNS = 256  # wider FFN rows are grouped into bins so the heatmap stays readable
MASK_LEARN_FIGURES: dict[str, tuple[str, list[Panel]]] = {
    "mask_learn_dynamics": ("mask_learn: target dims and duals", [
        ("target dims: attention units", [("target_dims/attn", "target"), ("kept/attn_mean", "kept (mean)")]),
        ("target dims: FFN channels", [("target_dims/ffn", "target"), ("kept/ffn_mean", "kept (mean)")]),
        ("duals", [("dual/z", "z (budget)"), ("dual/y_attn_mean", "y attn (mean)"),
                   ("dual/y_ffn_mean", "y ffn (mean)")])]),
    "mask_learn_sparsity": ("mask_learn: parameter ratio vs budget", [
        ("prunable params / source", [("sparsity/params_ratio", "params ratio"),
                                      ("sparsity/budget_ratio", "budget ratio")])]),
}
SHAPE_ROWS = (("query heads", "num_attention_heads"), ("KV heads", "num_key_value_heads"),
              ("head_dim", "head_dim"), ("FFN channels", "intermediate_size"),
              ("hidden", "hidden_size"), ("layers", "num_hidden_layers"))


def _read_json(path: Path | None) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _output(run: RunDir, stage: str, key: str) -> Path | None:
    """A done stage's recorded output path; None when the stage is not done."""
    state = run.state(stage)
    value = (state.outputs or {}).get(key) if state.status == "done" else None
    return Path(value) if value else None


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir():
        return {}
    # size_guidance 0 keeps every scalar: the default reservoir would subsample long runs.
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _plot_panels(scalars: dict[str, list[tuple[int, float]]], panels: list[Panel], title: str,
                 path: Path) -> bool:
    import matplotlib.pyplot as plt

    panels = [(name, [(t, lbl) for t, lbl in lines if t in scalars]) for name, lines in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels):
        for tag, label in lines:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, marker="o" if len(steps) < 10 else None, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _loss_lines(scalars: dict[str, list[tuple[int, float]]]) -> list[tuple[str, str]]:
    # The first train tag present is "train"; CE is added only when it differs from it (mask_learn
    # logs total = CE + distillation; continued_pretrain logs train == CE).
    train = [t for t in TRAIN_TAGS if t[0] in scalars]
    lines = train[:1] + [t for t in train[1:] if t[0] == "loss/ce"]
    return lines + [("loss/valid", "validation")]


def _dev_lines(scalars: dict[str, list[tuple[int, float]]]) -> list[tuple[str, str]]:
    """The stage's dev texts (TrainingLoop.score_dev): each text's perplexity and their geomean."""
    from maskprune.training import DEV_TEXT_TAG

    texts = sorted(tag for tag in scalars if tag.startswith(DEV_TEXT_TAG))
    return [(tag, tag.removeprefix(DEV_TEXT_TAG)) for tag in texts] + [("loss/dev_ppl_geomean", "geomean")]


def heatmap(keep: Any, source: dict[str, Any], path: Path) -> None:
    """Rows = source layers, columns = query heads | FFN channels; white = kept (grey = partly kept bin)."""
    import matplotlib.pyplot as plt
    import numpy as np

    layers = keep.q_heads.shape[0]
    kept_layers = set(keep.layers.tolist()) if keep.layers is not None else set(range(layers))
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.3 * layers), gridspec_kw={"width_ratios": [1, 3]})
    for ax, name, width, title in ((axes[0], "q_heads", source["num_attention_heads"], "query heads"),
                                   (axes[1], "ffn", source["intermediate_size"], "FFN channels")):
        grid = np.zeros((layers, width))
        for layer in kept_layers:
            grid[layer, getattr(keep, name)[layer].numpy()] = 1.0
        group = math.ceil(width / MAX_COLUMNS)
        if group > 1:
            pad = (-width) % group
            grid = np.pad(grid, ((0, 0), (0, pad))).reshape(layers, -1, group).mean(axis=2)
            title += f" (bins of {group}, shade = kept fraction)"
        ax.imshow(grid, aspect="auto", cmap="gray", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"kept {title}")
        ax.set_xlabel("unit" if group == 1 else "bin")
        ax.set_ylabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _shape(config: dict[str, Any] | None) -> dict[str, int] | None:
    if config is None:
        return None
    shape = {key: config.get(key) for _, key in SHAPE_ROWS}
    shape["num_key_value_heads"] = shape["num_key_value_heads"] or config["num_attention_heads"]
    shape["head_dim"] = shape["head_dim"] or config["hidden_size"] // config["num_attention_heads"]
    return shape


def collect(run: RunDir) -> dict[str, Any]:
    """Everything the report shows, from the run directory; absent pieces are None."""
    model = _output(run, "prepare", "model")
    summary = _read_json(_output(run, "mask_learn", "summary"))
    prune = _read_json(_output(run, "hard_prune", "report"))
    source = _shape(_read_json(model / "config.json") if model else None)
    final = _shape(prune["config"] if prune else summary["final_shape"] if summary else None)
    params = ((prune["params_before"], prune["params_after"]) if prune else
              (summary["params"]["source"], summary["params"]["final"]) if summary else None)
    results_path = _output(run, "evaluate", "results")
    return {"stages": {s: run.state(s).status for s in STAGES}, "source": source, "final": final,
            "params": params, "results": _read_json(results_path),
            "results_md": results_path.with_suffix(".md") if results_path else None,
            "masks": _output(run, "mask_learn", "masks"), "checkpoint": run.final_checkpoint()}


def _ppl_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(convention label, {model: ppl}) at 128 tokens and the longest other length: the held-out
    texts' geometric mean first (where evaluated), then eval_text."""
    lengths = sorted({int(n) for m in results["models"].values()
                      for n in m.get("ppl", {}).get("eval_text", {})})
    chosen = ([128] if 128 in lengths else []) + [n for n in lengths[-1:] if n != 128]
    heldout = {name: m["heldout"]["geomean"] for name, m in results["models"].items() if m.get("heldout")}
    rows = [(f"held-out geomean @{n}", {name: g[str(n)] for name, g in heldout.items() if str(n) in g})
            for n in chosen if heldout]
    return rows + [(f"eval_text @{n}", {name: m["ppl"]["eval_text"][str(n)]["ppl"]
                                        for name, m in results["models"].items()
                                        if str(n) in m.get("ppl", {}).get("eval_text", {})})
                   for n in chosen]


def text_summary(info: dict[str, Any], report_md: Path) -> str:
    lines = []
    missing = [s for s, status in info["stages"].items() if status != "done"]
    if missing:
        lines.append(f"stages not done: {', '.join(missing)}")
    source, final = info["source"], info["final"]
    if source and final:
        per_layer = ", ".join(f"{label} {source[key]} -> {final[key]}" for label, key in SHAPE_ROWS[:4]
                              if key != "head_dim")
        lines.append(f"final shape per layer: {per_layer}")
        for label, key in SHAPE_ROWS[4:]:
            if source[key] != final[key]:
                lines.append(f"{label}: {source[key]} -> {final[key]}")
    if info["params"]:
        before, after = info["params"]
        lines.append(f"parameters: {before:,} -> {after:,} ({100 * (before - after) / before:.1f}% removed)")
    if info["results"]:
        for label, values in _ppl_rows(info["results"]):
            lines.append(f"perplexity {label}: " + " -> ".join(f"{v:.2f} ({k})" for k, v in values.items()))
    lines.append(f"final checkpoint: {info['checkpoint'] or '-'}")
    lines.append(f"report: {report_md}")
    return "\n".join(lines)


def _markdown(run: RunDir, info: dict[str, Any], images: dict[str, str]) -> str:
    md = [f"# Run report: {run.load_config().name}", "", f"Run directory: `{run.root}`  ",
          f"Final checkpoint: `{info['checkpoint'] or '-'}`", "", "## Stages", "",
          "| stage | status |", "|---|---|"]
    md += [f"| {s} | {status} |" for s, status in info["stages"].items()]
    missing = [s for s, status in info["stages"].items() if status != "done"]
    md += ["", f"Not done: {', '.join(missing)}." if missing else "All stages done.", "",
           "## Final shape", ""]
    source, final = info["source"], info["final"]
    if source:
        md += ["| | source | final |", "|---|---|---|"]
        md += [f"| {label} | {source[key]} | {final[key] if final else '-'} |"
               for label, key in SHAPE_ROWS]
        before, after = info["params"] or (None, None)
        md.append(f"| parameters | {f'{before:,}' if before else '-'} | {f'{after:,}' if after else '-'} |")
    else:
        md.append("Not available: the prepare stage is not done.")
    md += ["", "## Evaluation", ""]
    if info["results_md"] and info["results_md"].is_file():
        # results.md's own heading is dropped; its table and notes are embedded as written.
        body = [line for line in info["results_md"].read_text().splitlines() if not line.startswith("# ")]
        md += "\n".join(body).strip().splitlines()
    else:
        md.append("Not available: the evaluate stage is not done.")
    md += ["", "## Plots", ""]
    md += ([f"### {title}\n\n![{title}]({rel})\n" for title, rel in images.items()]
           or ["No plots: no stage logged any."])
    return "\n".join(md).rstrip() + "\n"


def write_report(run_root: Path) -> tuple[Path, str]:
    """Write RUN/report.md and RUN/report/*.png; return the report path and the text summary."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from maskprune.masks_io import load_keep_indices

    run = RunDir(run_root)
    if not run.exists():
        raise RunDirError(f"{run.root}: not a run directory (no config.toml); nothing to report")
    info = collect(run)
    out = run.root / "report"
    out.mkdir(exist_ok=True)
    for stale in out.glob("*.png"):  # the folder must show this report's plots only
        stale.unlink()
    images: dict[str, str] = {}
    for stage in STAGES:
        scalars = read_scalars(run.tb_dir(stage))
        figures = {f"loss_{stage}": (f"{stage}: loss", [("loss (nats)", _loss_lines(scalars))]),
                   f"dev_{stage}": (f"{stage}: dev texts", [("perplexity", _dev_lines(scalars))])}
        figures.update(MASK_LEARN_FIGURES if stage == "mask_learn" else {})
        for name, (title, panels) in figures.items():
            if _plot_panels(scalars, panels, title, out / f"{name}.png"):
                images[title] = f"report/{name}.png"
    if info["masks"] and info["source"]:
        heatmap(load_keep_indices(info["masks"]), info["source"], out / "kept_units.png")
        images["kept units per layer"] = "report/kept_units.png"
    report_md = run.root / "report.md"
    atomic_write_text(report_md, _markdown(run, info, images))
    return report_md, text_summary(info, report_md)

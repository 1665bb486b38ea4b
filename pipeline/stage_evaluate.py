"""Stage 6, evaluate: dense, pruned and pruned + continued-pretrain side by side in one table.

    python pipeline/stage_evaluate.py --run-dir runs/tiny

Per model: parameters, perplexity on data.eval_text and on the validation token shards at each
evaluate.ppl_chunk_lengths (maskprune.evaluation), zero-shot acc / acc_norm on evaluate.tasks
(maskprune.zero_shot), forward tokens/s. Writes RUN/evaluate/results.json and results.md.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from maskprune.corpus import CorpusError, iter_documents
from maskprune.dist import log, stage_argv_parser
from maskprune.evaluation import (EvaluationError, chunk_lengths, forward_tokens_per_s, param_count,
                                  perplexity, shard_tokens, text_tokens)
from maskprune.rundir import RunDirError, atomic_write_json, atomic_write_text
from maskprune.stage import StageRun, run_stage
from maskprune.zero_shot import TaskSpecError, task_configs, zero_shot

# (name in the report, stage whose "model" output it is), for each of config.EVALUATED_MODELS
MODELS = (("dense", "prepare"), ("pruned", "hard_prune"), ("pruned+cpt", "export"))


def _load(path: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # dtype="auto": evaluate each checkpoint in the dtype it was saved in (reported per model).
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def evaluate_run(run: StageRun) -> dict[str, Any]:
    cfg = run.cfg.evaluate
    configs = task_configs(cfg.tasks)  # bad task files fail (and olmo7 data is fetched) first
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {"models": {}, "skipped": {}, "conventions": {}}
    try:
        shard_dir = run.upstream("tokenize", "data")
    except RunDirError as err:
        shard_dir, report["skipped"]["valid_shards"] = None, str(err)
    loaded = {}
    for name, stage in MODELS:
        if name not in cfg.models:
            continue
        try:
            path = run.upstream(stage, "model")
        except RunDirError as err:
            log(f"evaluate: skipping {name}: {err}")
            report["skipped"][name] = str(err)
            continue
        model, tokenizer = _load(path, device)
        lengths = chunk_lengths(cfg.ppl_chunk_lengths, model.config.max_position_embeddings)
        report["conventions"].update({str(k): v for k, v in lengths.items()})
        streams = {"eval_text": text_tokens(tokenizer, iter_documents(run.cfg.data.eval_text),
                                            cfg.eval_text_max_tokens)}
        if shard_dir:
            streams["valid_shards"] = shard_tokens(shard_dir, cfg.eval_text_max_tokens)
        ppl = {src: {str(n): perplexity(model, ids, n, cfg.batch_size) for n in lengths}
               for src, ids in streams.items()}
        log(f"evaluate: {name}: ppl " + ", ".join(f"{src}@{n} {v['ppl']:.3f}"
                                                 for src, row in ppl.items() for n, v in row.items()))
        report["models"][name] = {
            "path": path, "params": param_count(model), "dtype": str(model.dtype).removeprefix("torch."),
            "tokens": {src: ids.numel() for src, ids in streams.items()}, "ppl": ppl,
            "zero_shot": zero_shot(model, tokenizer, configs, cfg.batch_size, cfg.limit) if configs else {}}
        loaded[name] = model
    if not loaded:
        raise EvaluationError("evaluate: no model to evaluate; finish the prepare stage first")
    # One batch for all: the shortest vocabulary and context among the models.
    seq_len = min(max(chunk_lengths(cfg.ppl_chunk_lengths, m.config.max_position_embeddings))
                  for m in loaded.values())
    vocab = min(m.config.vocab_size for m in loaded.values())
    speed = forward_tokens_per_s(loaded, vocab, seq_len, cfg.batch_size, cfg.throughput_steps)
    for name, tokens_per_s in speed.items():
        report["models"][name]["forward_tokens_per_s"] = tokens_per_s
    report["throughput"] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
                            f"cpu ({torch.get_num_threads()} threads)", "batch_size": cfg.batch_size,
                            "seq_len": seq_len, "steps": cfg.throughput_steps}
    report["eval_text"] = (f"data.eval_text ({run.cfg.data.eval_text.kind} "
                           f"{run.cfg.data.eval_text.path or run.cfg.data.eval_text.split}): documents "
                           "joined by a newline into one stream, tokenized without special tokens, "
                           f"first {cfg.eval_text_max_tokens or 'all'} tokens")
    report["limit"] = cfg.limit
    return report


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    models = report["models"]
    names = list(models)
    rows = [("parameters", [f"{models[n]['params']:,}" for n in names]),
            ("dtype", [models[n]["dtype"] for n in names])]
    for src in ("eval_text", "valid_shards"):
        for length in report["conventions"]:
            cells = [models[n]["ppl"].get(src, {}).get(length, {}).get("ppl") for n in names]
            if any(c is not None for c in cells):
                rows.append((f"ppl {src} @{length}", [_fmt(c) for c in cells]))
    tasks = list(next(iter(models.values()))["zero_shot"])
    for task in tasks:
        rows.append((f"{task} acc / acc_norm", [f"{_fmt(models[n]['zero_shot'][task]['acc'])} / "
                                                f"{_fmt(models[n]['zero_shot'][task]['acc_norm'])}"
                                                for n in names]))
    if tasks:
        rows.append((f"mean acc ({len(tasks)} tasks)",
                     [_fmt(sum(models[n]["zero_shot"][t]["acc"] for t in tasks) / len(tasks))
                      for n in names]))
    rows.append(("forward tokens/s", [f"{models[n]['forward_tokens_per_s']:,.0f}" for n in names]))
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    tp = report["throughput"]
    notes = [f"- ppl @L: {text}" for text in
             (f"L={length}: {conv}" for length, conv in report["conventions"].items())]
    notes += [f"- eval_text: {report['eval_text']}",
              "- valid_shards: the tokenize stage's validation sequences concatenated in order, same cap",
              "- ppl = exp(sum NLL / predicted tokens); each chunk's first token is not predicted; "
              "a trailing partial chunk is dropped",
              f"- zero-shot: lm-evaluation-harness, 0-shot, limit {report['limit'] or 'none'} per task",
              f"- forward tokens/s: {tp['device']}, batch {tp['batch_size']} x {tp['seq_len']} tokens, "
              f"{tp['steps']} timed passes per model, alternating between models"]
    notes += [f"- not evaluated: {what}: {why}" for what, why in report["skipped"].items()]
    return "\n".join(["# Evaluation", "", *lines, "", *notes, ""])


def main() -> None:
    args = stage_argv_parser(__doc__).parse_args()
    run = StageRun("evaluate", args.run_dir)
    try:
        report = evaluate_run(run)
    except (EvaluationError, TaskSpecError, CorpusError) as err:
        print(f"maskprune: error: {err}", file=sys.stderr)
        sys.exit(2)
    atomic_write_json(run.dir / "results.json", report)
    atomic_write_text(run.dir / "results.md", markdown(report))
    log(f"evaluate: wrote {run.dir / 'results.md'}")
    run.finish({"results": str(run.dir / "results.json")})


if __name__ == "__main__":
    run_stage(main)

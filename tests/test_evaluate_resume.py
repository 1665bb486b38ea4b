"""The evaluate stage keeps each part of each model's figures as it is measured: a stop request ends
it after the part in progress, a killed attempt loses only the part in progress, and the next
attempt measures only what is missing, to the same figures as one uninterrupted attempt."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from helpers import REPO, cpu_env
from maskprune.dist import PREEMPTED_EXIT_CODE
from maskprune.rundir import RunDir
from test_evaluate_memory import random_llama, tokenizer_dir, write_run  # noqa: F401 (a fixture)

# Loaded by the stage's processes (first on PYTHONPATH): after every part it writes down which one
# (WITH_PID: and which process), and from the AFTER_PARTS-th of this attempt on it writes the stop
# file, or at that part kills the process, so the interruption falls between two known parts
# instead of wherever a timer would put it. With WITH_PID the stop also waits until two processes
# have written a part: on a busy machine one worker can finish many parts before the other starts.
PART_WATCH = '''import os, signal
from pathlib import Path
from maskprune import eval_parts
_put = eval_parts.PartStore.put
def put(self, part, value):
    _put(self, part, value)
    log = Path(os.environ["PARTS_LOG"])
    with log.open("a") as handle:
        handle.write((f"{os.getpid()} " if os.environ.get("WITH_PID") else "") + f"{self.folder.name}/{part}\\n")
    lines = log.read_text().splitlines()
    written, after = len(lines), int(os.environ.get("AFTER_PARTS", "0"))
    writers = len({line.split(" ", 1)[0] for line in lines}) if os.environ.get("WITH_PID") else 2
    if os.environ["THEN"] == "stop" and 0 < after <= written and writers >= 2:  # >=: two may append at once
        Path(os.environ["STOP_FILE"]).touch()
    elif os.environ["THEN"] == "kill" and written == after:
        os.kill(os.getpid(), signal.SIGKILL)
eval_parts.PartStore.put = put
'''

QUESTIONS = {"capitals": [("The capital of France is", ["Paris", "purple"], 0)],
             "verbs": [("He said the company", ["will", "banana"], 0), ("The stock market", ["fell", "blue"], 0)]}


def evaluate(run_dir: Path, tmp_path: Path, attempt: str,
             **watch: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """One attempt of the stage; returns it and the parts it wrote, in order."""
    guard = tmp_path / "watch"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(PART_WATCH)
    log = tmp_path / f"{attempt}.parts"
    env = cpu_env(PARTS_LOG=str(log), STOP_FILE=str(run_dir / "STOP"), **{"THEN": "none", **watch})
    env["PYTHONPATH"] = f"{guard}:{REPO}"
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "stage_evaluate.py"), "--run-dir",
                           str(run_dir)], env=env, capture_output=True, text=True, timeout=600)
    return proc, log.read_text().splitlines() if log.exists() else []


def figures(run_dir: Path) -> dict:
    """results.json without the timings, which no two attempts share."""
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    for row in results["models"].values():
        row.pop("forward_tokens_per_s")
    return results


# Per model: model, ppl, heldout, two zero-shot tasks (one question per part), throughput; then the
# run's overlap count.
PER_MODEL = ["model", "ppl", "heldout", "zero_shot.capitals.0-1", "zero_shot.verbs.0-1", "zero_shot.verbs.1-2",
             "throughput"]
MODEL_PARTS = [f"{name}/{part}" for name in ("dense", "pruned", "pruned+cpt") for part in PER_MODEL]
EVERY_PART = [*MODEL_PARTS, "run/heldout_in_training"]


def three_models(tmp_path: Path, tokenizer_dir: Path) -> Callable[..., Path]:  # noqa: F811
    """Three small random Llamas recorded as prepare's, hard_prune's and export's models, two task
    files and a held-out text; returns new_run(root, evaluate_workers) making a run directory of them."""
    models = {"prepare": tmp_path / "dense", "hard_prune": tmp_path / "pruned", "export": tmp_path / "cpt"}
    for seed, (stage, folder) in enumerate(models.items()):
        random_llama(folder, tokenizer_dir, 64, 2, 2, 1, 128 if stage == "prepare" else 64, seed=seed)
    tasks = []
    for name, rows in QUESTIONS.items():
        tasks.append(tmp_path / f"{name}.jsonl")
        tasks[-1].write_text("\n".join(json.dumps({"query": q, "choices": c, "gold": g}) for q, c, g in rows))
    held = tmp_path / "held.txt"
    held.write_text(" ".join(f"line {i} of a text that no stage trains on." for i in range(600)))

    def new_run(root: Path, evaluate_workers: int = 1) -> Path:
        root.mkdir()
        run_dir = write_run(root, models, [str(t) for t in tasks])
        run = RunDir(run_dir)
        cfg = run.load_config()
        cfg.evaluate.heldout_texts, cfg.evaluate.heldout_tokens = [
            type(cfg.data.eval_text)(kind="text", path=str(held))], 512
        cfg.evaluate.zero_shot_part_questions = 1  # "verbs" in two parts: a kill can fall inside a task
        cfg.launcher.evaluate_workers = evaluate_workers
        run.write_config(cfg)
        return run_dir

    return new_run


def test_an_interrupted_evaluation_measures_each_part_once(tokenizer_dir: Path, tmp_path: Path):  # noqa: F811
    new_run = three_models(tmp_path, tokenizer_dir)
    per_model, every_part = PER_MODEL, EVERY_PART

    reference = new_run(tmp_path / "a")
    proc, written = evaluate(reference, tmp_path, "reference")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert written == every_part
    assert not (reference / "evaluate" / "parts").exists()  # results.json holds them all

    run_dir = new_run(tmp_path / "b")
    # A stop request after the 4th part (dense's first zero-shot part): the stage ends before the 5th,
    # writes no results and says how to go on.
    proc, first = evaluate(run_dir, tmp_path, "first", AFTER_PARTS="4", THEN="stop")
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-4000:]
    assert first == every_part[:4] and "evaluate: stopped on request" in proc.stdout
    assert not (run_dir / "evaluate" / "results.json").exists()
    (run_dir / "STOP").unlink()  # as `maskprune run` does when it starts again
    # Killed after 8 more parts (inside the pruned model's "verbs" task): the parts written so far survive.
    proc, second = evaluate(run_dir, tmp_path, "second", AFTER_PARTS="8", THEN="kill")
    assert proc.returncode == -9
    assert second == every_part[4:12]
    assert ("4 part(s) measured by an earlier attempt are kept; measuring zero_shot.verbs.0-1, "
            "zero_shot.verbs.1-2, throughput") in proc.stdout
    proc, third = evaluate(run_dir, tmp_path, "third")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert third == every_part[12:]  # dense was not even loaded again; pruned's task went on at its 2nd part
    assert "5 part(s) measured by an earlier attempt are kept; measuring zero_shot.verbs.1-2, throughput" in proc.stdout
    assert first + second + third == every_part
    assert figures(run_dir) == figures(reference)
    assert not (run_dir / "evaluate" / "parts").exists()

    # Parts are valid only for what they were measured from: a pruned model from a re-run hard_prune
    # (another completion) is measured afresh, the dense model's parts are kept. Zero-shot parts of
    # another size (a user fitting a part to the partition's time limit) are new parts, the other
    # parts of the same model are kept.
    run_dir = new_run(tmp_path / "c")
    proc, first = evaluate(run_dir, tmp_path, "c_first", AFTER_PARTS="9", THEN="kill")
    assert proc.returncode == -9 and first == every_part[:9]
    random_llama(tmp_path / "pruned2", tokenizer_dir, 64, 2, 2, 1, 96, seed=7)
    run = RunDir(run_dir)
    run.mark_done("hard_prune", {"model": str(tmp_path / "pruned2")})
    cfg = run.load_config()
    cfg.evaluate.zero_shot_part_questions = 2
    run.write_config(cfg)
    proc, rest = evaluate(run_dir, tmp_path, "c_rest")
    assert proc.returncode == 0, proc.stderr[-4000:]
    resized = [part for part in per_model if "verbs" not in part]
    resized.insert(4, "zero_shot.verbs.0-2")
    assert rest == ["dense/zero_shot.verbs.0-2", *(f"{name}/{part}" for name in ("pruned", "pruned+cpt")
                                                   for part in resized), "run/heldout_in_training"]
    results, before = figures(run_dir), figures(reference)
    dense = results["models"]["dense"]
    assert dense["zero_shot"]["verbs"]["n"] == 2
    assert {k: v for k, v in dense.items() if k != "zero_shot"} == \
        {k: v for k, v in before["models"]["dense"].items() if k != "zero_shot"}
    assert results["models"]["pruned"]["path"] == str(tmp_path / "pruned2")
    assert results["models"]["pruned"]["params"] != before["models"]["pruned"]["params"]


def by_process(lines: list[str]) -> dict[str, list[str]]:
    """WITH_PID parts-log lines, grouped by the process that wrote them, in order."""
    parts: dict[str, list[str]] = {}
    for line in lines:
        pid, part = line.split(" ", 1)
        parts.setdefault(pid, []).append(part)
    return parts


def test_workers_share_the_parts_and_the_report_is_one_process(tokenizer_dir: Path, tmp_path: Path):  # noqa: F811
    """launcher.evaluate_workers = 2 on CPU: the stage deals the missing parts round-robin to two
    processes of itself and assembles their parts into the same figures as one process; a stop
    request reaches both, and the next attempt deals out only what is still missing."""
    new_run = three_models(tmp_path, tokenizer_dir)
    reference = new_run(tmp_path / "one")
    proc, _ = evaluate(reference, tmp_path, "one")
    assert proc.returncode == 0, proc.stderr[-4000:]

    run_dir = new_run(tmp_path / "two", evaluate_workers=2)
    proc, written = evaluate(run_dir, tmp_path, "two", WITH_PID="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "evaluate: 21 part(s) over 2 workers" in proc.stdout
    assert sorted(by_process(written).values()) == sorted([MODEL_PARTS[0::2], MODEL_PARTS[1::2],
                                                           ["run/heldout_in_training"]])
    assert figures(run_dir) == figures(reference)
    assert not (run_dir / "evaluate" / "parts").exists()

    run_dir = new_run(tmp_path / "stopped", evaluate_workers=2)
    proc, first = evaluate(run_dir, tmp_path, "stopped_first", WITH_PID="1", AFTER_PARTS="6", THEN="stop")
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-4000:]
    assert "evaluate: stopped on request" in proc.stdout
    # The stop is written at the first part from the 6th on by which both workers have written one;
    # after it the other worker ends the part it is in, and nothing more is measured.
    stop_at = next(i for i in range(5, len(first)) if len(by_process(first[:i + 1])) == 2)
    assert len(by_process(first)) == 2 and stop_at + 1 <= len(first) <= stop_at + 2
    (run_dir / "STOP").unlink()
    proc, rest = evaluate(run_dir, tmp_path, "stopped_rest", WITH_PID="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"evaluate: {21 - len(first)} part(s) over 2 workers" in proc.stdout
    done = [part for parts in by_process(first).values() for part in parts]
    again = [part for parts in by_process(rest).values() for part in parts]
    assert sorted(done + again) == sorted(EVERY_PART)  # each part once over both attempts
    assert figures(run_dir) == figures(reference)

"""The run directory: frozen config, one folder and one state record per stage, fingerprints.

    RUN/config.toml              resolved experiment, frozen at first start
    RUN/<stage>/state.json       pending | running | done | failed, config hash, input ids, outputs
    RUN/<stage>/...              the stage's outputs (written atomically by the stage)
    RUN/tb/<stage>/              TensorBoard events, rank 0

A stage's fingerprint has two parts: the hash of the config sections it reads, and the completion
ids of the stages it reads from. A changed config is refused unless --force (the user must mean
it), naming each changed field from the sections the record keeps; a field an upgrade added, at its
default, is not a change. A re-run upstream stage simply makes the stages after it run again.

Outputs inside the run directory are recorded relative to it, so a run directory moved or copied as
a whole (off a purged scratch file system, onto another mount) reads its own files; `branch_run`
makes a light copy that reads a finished run's outputs where they are.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskprune.config import (LEARNER_ONLY_FIELDS, ConfigError, ExperimentConfig, config_from_dict, config_to_dict,
                              dump_config, flatten, load_config)
from maskprune.ds_json import DsConfigError, settle

STAGES = ("prepare", "tokenize", "mask_learn", "hard_prune", "continued_pretrain", "export", "evaluate")

# Which config sections (dotted for a single field) and which upstream stages each stage reads.
# prepare reads the text only to build the tiny model, so tokenize-only settings do not touch it.
STAGE_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("model", "data.sources", "data.seq_len"), ()),
    "tokenize": (("data",), ("prepare",)),
    "mask_learn": (("target", "mask_learn", "hard_prune.architecture"), ("prepare", "tokenize")),
    "hard_prune": (("hard_prune",), ("prepare", "mask_learn")),
    "continued_pretrain": (("continued_pretrain",), ("prepare", "tokenize", "hard_prune")),
    "export": (("export",), ("continued_pretrain",)),
    "evaluate": (("evaluate", "data.eval_text"), ("prepare", "tokenize", "hard_prune", "export")),
}


# Set in continued_pretrain's outputs by `maskprune clean --final` (maskprune.cleanup): export reads
# that checkpoint, so it cannot run again from this record.
FINAL_CHECKPOINT_REMOVED = "final_checkpoint_removed"


# state.json's list of the outputs recorded relative to the run directory.
RELATIVE_OUTPUTS = "relative_outputs"


def path_inside(value: Any, root: Path) -> Path | None:
    """`value` as a Path when it is an absolute path (str or Path) inside `root`: what a record
    names relative to the run directory, so the directory can move as a whole; else None."""
    if isinstance(value, (str, Path)) and Path(value).is_absolute() and Path(value).is_relative_to(root):
        return Path(value)
    return None


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says what to do."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename so a kill never leaves a half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def disk_bytes(path: Path) -> int:
    """The bytes of a file, or of every file under a folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def human_bytes(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def stage_config(cfg: ExperimentConfig, stage: str) -> dict[str, Any]:
    """The config sections `stage` reads (STAGE_INPUTS), as its state record keeps them. A one-shot
    method's mask_learn leaves out the learner's own settings (LEARNER_ONLY_FIELDS): it reads none."""
    sections, _ = STAGE_INPUTS[stage]
    raw = config_to_dict(cfg)
    chosen = {}
    for name in sections:
        value: Any = raw
        for part in name.split("."):
            value = value[part]
        chosen[name] = value
    if stage == "mask_learn" and chosen["mask_learn"]["method"] != "maskprune":
        chosen["mask_learn"] = {k: v for k, v in chosen["mask_learn"].items() if k not in LEARNER_ONLY_FIELDS}
    return json.loads(json.dumps(chosen))  # as the record reads back (tuples are lists there)


def _digest(chosen: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg: ExperimentConfig, stage: str) -> str:
    return _digest(stage_config(cfg, stage))


_UNSET = object()


def _as_read_now(recorded: dict[str, Any], cfg: ExperimentConfig, stage: str) -> dict[str, Any] | None:
    """A recorded stage config as this version reads it: fields added since get their defaults. None
    when this version cannot read it (a field since removed or renamed)."""
    raw = config_to_dict(cfg)
    for name, value in recorded.items():
        *parents, last = name.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value
    try:
        return stage_config(config_from_dict(raw), stage)
    except ConfigError:
        return None


def config_changes(state: StageState, cfg: ExperimentConfig, stage: str) -> tuple[list[str], list[str]]:
    """How `cfg` differs from the config a finished stage ran with: (changes, added). `changes`
    name each differing field as `key: old -> new`; `added` are fields this version added since,
    which the record lacks and `cfg` leaves at their defaults. A new field's default keeps the old
    behaviour, so an upgrade alone does not invalidate hours of finished work."""
    if state.config_hash == config_hash(cfg, stage):
        return [], []
    if state.config is None:
        return ["not listed (the stage was recorded by a maskprune that did not keep its config)"], []
    recorded = flatten(state.config)
    as_now = _as_read_now(state.config, cfg, stage)
    before = recorded if as_now is None else flatten(as_now)
    after = flatten(stage_config(cfg, stage))

    # A key only one side has: a list entry added or removed, or (when this version cannot read
    # the record) a field it no longer has.
    gone = "(absent)" if as_now is not None else "(no such setting now)"

    def show(flat: dict[str, Any], key: str, missing: str) -> str:
        return json.dumps(flat[key]) if key in flat else missing

    # Between a one-shot method and MaskPrune the learner's settings come and go with the method,
    # which is named: they are not listed one by one.
    learner = tuple(f"mask_learn.{name}" for name in LEARNER_ONLY_FIELDS)
    keys = sorted(key for key in set(before) | set(after)
                  if (key in before) == (key in after) or not key.startswith(learner))
    changes = [f"{key}: {show(before, key, '(absent)')} -> {show(after, key, gone)}"
               for key in keys if before.get(key, _UNSET) != after.get(key, _UNSET)]
    added = [key for key in keys if key not in recorded and key in before and before[key] == after.get(key, _UNSET)]
    return changes, added


@dataclass
class StageState:
    stage: str
    status: str = "pending"
    config_hash: str = ""
    config: dict[str, Any] | None = None  # the sections hashed (stage_config), to name what changed
    inputs: dict[str, str] | None = None
    completion_id: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    attempts: int = 0
    outputs: dict[str, Any] | None = None  # paths absolute in memory (RunDir.state resolves them)
    error: str = ""


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # ---------------------------------------------------------------- layout
    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def tb_dir(self, stage: str) -> Path:
        return self.root / "tb" / stage

    def exists(self) -> bool:
        return self.config_path.is_file()

    def load_config(self) -> ExperimentConfig:
        if not self.exists():
            raise RunDirError(f"{self.root}: not a run directory (no config.toml); "
                              "start one with `maskprune run CONFIG --run-dir DIR`")
        return load_config(self.config_path)

    def write_config(self, cfg: ExperimentConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, dump_config(cfg))

    # ---------------------------------------------------------------- state records
    def state(self, stage: str) -> StageState:
        path = self.stage_dir(stage) / "state.json"
        if not path.is_file():
            return StageState(stage=stage)
        record = json.loads(path.read_text())
        relative = record.pop(RELATIVE_OUTPUTS, [])
        state = StageState(**record)
        if state.outputs:  # records written before relative outputs hold absolute paths, read as they are
            state.outputs = {key: str(self.root / value) if key in relative else value
                             for key, value in state.outputs.items()}
        return state

    def save_state(self, state: StageState) -> None:
        folder = self.stage_dir(state.stage)
        folder.mkdir(parents=True, exist_ok=True)
        record, relative = dict(state.__dict__), []
        if state.outputs:
            record["outputs"] = dict(state.outputs)
            for key, value in state.outputs.items():
                if (path := path_inside(value, self.root)) is not None:
                    record["outputs"][key] = path.relative_to(self.root).as_posix()
                    relative.append(key)
        atomic_write_json(folder / "state.json", {**record, RELATIVE_OUTPUTS: relative})

    def input_ids(self, stage: str) -> dict[str, str]:
        _, upstream = STAGE_INPUTS[stage]
        return {name: self.state(name).completion_id for name in upstream}

    def mark_running(self, stage: str, cfg: ExperimentConfig) -> StageState:
        state = self.state(stage)
        state.status = "running"
        state.config = stage_config(cfg, stage)
        state.config_hash = _digest(state.config)
        state.inputs = self.input_ids(stage)
        state.started_at = time.time()
        state.attempts += 1
        state.error = ""
        self.save_state(state)
        return state

    def mark_done(self, stage: str, outputs: dict[str, Any] | None = None) -> StageState:
        state = self.state(stage)
        state.status = "done"
        state.finished_at = time.time()
        state.completion_id = uuid.uuid4().hex[:12]
        state.outputs = outputs or state.outputs
        self.save_state(state)
        return state

    def mark_failed(self, stage: str, error: str) -> None:
        state = self.state(stage)
        state.status = "failed"
        state.error = error
        self.save_state(state)

    def reset(self, stage: str) -> None:
        if stage not in STAGES:
            raise RunDirError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        state = self.state(stage)
        state.status = "pending"
        state.completion_id = ""
        self.save_state(state)

    def clear_stage(self, stage: str) -> None:
        """Before a fresh (not resumed) run: old outputs and checkpoints must not be resumed from."""
        folder = self.stage_dir(stage)
        state = self.state(stage)
        if folder.exists():
            shutil.rmtree(folder)
        shutil.rmtree(self.tb_dir(stage), ignore_errors=True)
        state.status, state.completion_id, state.outputs = "pending", "", None
        self.save_state(state)

    def final_checkpoint(self) -> str | None:
        for stage in ("export", "hard_prune"):
            state = self.state(stage)
            if state.status == "done" and state.outputs and state.outputs.get("model"):
                return state.outputs["model"]
        return None

    def summary(self) -> dict[str, Any]:
        stages = {}
        for stage in STAGES:
            state = self.state(stage)
            stages[stage] = {"status": state.status, "attempts": state.attempts,
                             "outputs": state.outputs or {}, "error": state.error}
        return {"run_dir": str(self.root), "stages": stages,
                "final_checkpoint": self.final_checkpoint()}


@dataclass
class StageDecision:
    stage: str
    action: str  # "skip" | "run" | "refuse"
    reason: str
    changes: tuple[str, ...] = ()  # each changed config field, `key: old -> new`


def resume_refusal(run_dir: RunDir, cfg: ExperimentConfig, stage: str) -> str:
    """Why a training stage cannot resume: its ds_config changes what its checkpoints were trained
    under (maskprune.ds_json). A file that cannot be read at all is preflight's to report."""
    section = getattr(cfg, stage, None)
    if not hasattr(section, "ds_config"):
        return ""
    try:
        return settle(stage, run_dir.stage_dir(stage), section.ds_config).refusal
    except DsConfigError:
        return ""


def plan(run_dir: RunDir, cfg: ExperimentConfig, force: bool) -> list[StageDecision]:
    """Decide per stage, in order, before anything runs: skip, run (and why), or refuse."""
    decisions: list[StageDecision] = []
    rerun: set[str] = set()
    for stage in STAGES:
        state = run_dir.state(stage)
        _, upstream = STAGE_INPUTS[stage]
        added: list[str] = []
        changes: list[str] = []
        if state.status != "done":
            action, reason = "run", ("resume" if state.status in ("running", "failed") else "new")
            refusal = resume_refusal(run_dir, cfg, stage) if reason == "resume" else ""
            if refusal and force:
                reason = "ds_config changed (--force)"
            elif refusal:
                action, reason = "refuse", refusal
        else:
            changes, added = config_changes(state, cfg, stage)
            if changes and force:
                action, reason = "run", "config changed (--force)"
            elif changes:
                action, reason = "refuse", "config changed: " + "; ".join(changes)
            elif any(name in rerun for name in upstream) or state.inputs != run_dir.input_ids(stage):
                action, reason = "run", "an input stage was re-run"
            else:
                action, reason = "skip", "done"
        if action == "run" and stage == "export" and "continued_pretrain" not in rerun and \
                (run_dir.state("continued_pretrain").outputs or {}).get(FINAL_CHECKPOINT_REMOVED):
            action, reason = "refuse", ("continued_pretrain's final checkpoint, which export reads, was removed by "
                                        f"`maskprune clean --final`; re-run it first: maskprune reset {run_dir.root} "
                                        "continued_pretrain")
            changes = []  # --force cannot help here: the refusal must not read as a config change
        if added and action != "refuse":
            reason += f" (ran before {', '.join(added)} existed; taken at this version's default)"
        if action == "run":
            rerun.add(stage)
        decisions.append(StageDecision(stage, action, reason, tuple(changes)))
    return decisions


def branch_run(source: str | Path, dest: str | Path, skip: tuple[str, ...] = ()) -> RunDir:
    """A new run directory `dest` whose finished stages are `source`'s, read where they are: its
    records name `source`'s outputs by absolute path, so the files matching `skip` (shutil patterns:
    models, token shards, checkpoints) need not be copied. Checkpoints copied along name their model
    relative to themselves: skip them, or copy the models with them. A stage that runs in the branch
    writes into it (`clear_stage` first); the branch must not outlive the outputs it reads."""
    origin = RunDir(source)
    shutil.copytree(origin.root, dest, ignore=shutil.ignore_patterns(*skip))
    branch = RunDir(dest)
    for stage in STAGES:
        if (origin.stage_dir(stage) / "state.json").is_file():
            branch.save_state(origin.state(stage))
    return branch


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def digest_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            h.update(block)
    return h.hexdigest()

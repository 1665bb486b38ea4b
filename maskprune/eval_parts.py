"""The evaluate stage's finished measurements, kept one part at a time, so a stage that was stopped,
preempted or killed measures only what is missing when it runs again.

At 70B the evaluate stage is hours of one process on one node: three models, each spread over the
node's GPUs and taken through perplexities, held-out texts and the zero-shot suite. Without this a
time limit, a preemption or a crash started it again from the first model, and a stage longer than
the partition's time limit could never finish. Each part (one model's perplexities, its held-out
texts, one zero-shot task, its throughput; the run's held-out overlap count) is written the moment it
is measured, to `RUN/evaluate/parts/<owner>/<part>.json`, with the digest of what it was measured
from (the model's stage completion, the evaluate settings, the texts, the device); a part whose
digest no longer matches is measured again. The stage removes the folder once results.json is written.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from maskprune.rundir import atomic_write_text


def digest(inputs: Any) -> str:
    """A stable digest of JSON-able inputs (anything else by its str)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PartStore:
    """The finished parts of one owner (a model, or the run), valid for one set of inputs."""

    def __init__(self, folder: Path, inputs: dict[str, Any]):
        self.folder = folder
        self.inputs = digest(inputs)

    def _path(self, part: str) -> Path:
        return self.folder / f"{part}.json"

    def _record(self, part: str) -> dict[str, Any] | None:
        """The stored part, if it was measured from these inputs."""
        path = self._path(part)
        record = json.loads(path.read_text()) if path.is_file() else None
        return record if record is not None and record["inputs"] == self.inputs else None

    def __contains__(self, part: str) -> bool:
        return self._record(part) is not None

    def __getitem__(self, part: str) -> Any:
        record = self._record(part)
        if record is None:
            raise KeyError(part)
        return record["value"]

    def put(self, part: str, value: Any) -> None:
        """Keep `value` (JSON-able) as `part`, atomically: a kill leaves the old file or the new one.
        Keys keep their order (the report lists texts and tasks in the order they were measured)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(part), json.dumps({"inputs": self.inputs, "value": value}) + "\n")

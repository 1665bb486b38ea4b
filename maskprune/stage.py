"""What every stage script does at its start and end, so the scripts in pipeline/ stay thin.

A stage owns its state record: it marks itself running (also when started by hand or by a SLURM
script rather than `maskprune run`) and done with its outputs, on rank 0, only after its outputs
are complete on disk.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from maskprune.config import ExperimentConfig
from maskprune.rundir import RunDir, RunDirError


class StageRun:
    def __init__(self, stage: str, run_dir: str | Path, is_rank0: bool = True):
        self.stage = stage
        self.run = RunDir(run_dir)
        self.cfg: ExperimentConfig = self.run.load_config()
        self.dir = self.run.stage_dir(stage)
        self.is_rank0 = is_rank0
        self.dir.mkdir(parents=True, exist_ok=True)
        if is_rank0 and self.run.state(stage).status != "running":
            self.run.mark_running(stage, self.cfg)

    def upstream(self, stage: str, key: str) -> str:
        """An output of a finished earlier stage; a clear error if it has not finished."""
        state = self.run.state(stage)
        if state.status != "done" or not state.outputs or key not in state.outputs:
            raise RunDirError(f"stage {self.stage} needs {key!r} from stage {stage}, which is "
                              f"{state.status}; run `maskprune run` to finish it first")
        return state.outputs[key]

    @property
    def tb_dir(self) -> Path:
        return self.run.tb_dir(self.stage)

    def finish(self, outputs: dict[str, Any]) -> None:
        if self.is_rank0:
            self.run.mark_done(self.stage, outputs)


def publish_dir(tmp: Path, final: Path) -> None:
    """Make a fully written output folder visible under its final name in one rename, so a kill
    never leaves a half-written folder that looks finished."""
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def staging_dir(final: Path) -> Path:
    """A fresh sibling folder to write into before `publish_dir`."""
    tmp = final.with_name(f".{final.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp

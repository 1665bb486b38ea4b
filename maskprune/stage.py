"""What every stage script does at its start and end, so the scripts in pipeline/ stay thin.

A stage owns its state record: it marks itself running (also when started by hand or by a SLURM
script rather than `maskprune run`) and done with its outputs, on rank 0, only after its outputs
are complete on disk.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from maskprune.config import ConfigError, ContinuedPretrainConfig, ExperimentConfig, MaskLearnConfig
from maskprune.ds_json import DsConfigError, frozen_path, read, resolve, settle
from maskprune.lifeline import follow_launchers
from maskprune.rundir import RunDir, RunDirError, StageDecision, atomic_write_json
from maskprune.runlock import RunLock, RunLockError, acquire_run_lock

if TYPE_CHECKING:
    from maskprune.dist import DistInfo


def _distributed():
    """torch.distributed when this process is a rank of an initialised job, else None."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed
    return None


def lock_run_dir(root: Path, stage: str, is_rank0: bool) -> RunLock | None:
    """Global rank 0 holds the run directory's lock (or checks that the `maskprune run` that started
    it does); on a refusal every rank of the job stops before touching the run directory."""
    lock, error = None, None
    if is_rank0:
        try:
            lock = acquire_run_lock(root, f"stage {stage}")
        except RunLockError as err:
            error = err
    raise_on_every_rank(error, RunLockError(f"{root}: rank 0 could not lock it (see its message)"))
    if lock is not None:
        atexit.register(lock.release)
    return lock


def raise_on_every_rank(error: Exception | None, elsewhere: Exception) -> None:
    """Every rank of the job raises when any rank met `error` (a rank that did not raises
    `elsewhere`), rather than waiting for it in the next collective."""
    distributed = _distributed()
    if distributed is not None:
        import torch

        from maskprune.dist import on_gpu

        failed = torch.tensor([1.0 if error else 0.0], device="cuda" if on_gpu() else "cpu")
        distributed.all_reduce(failed, op=distributed.ReduceOp.MAX)
        if failed.item() > 0 and error is None:
            error = elsewhere
    if error is not None:
        raise error


class StageRun:
    def __init__(self, stage: str, run_dir: str | Path, is_rank0: bool = True):
        self.stage = stage
        self.run = RunDir(run_dir)
        self.lock = lock_run_dir(self.run.root, stage, is_rank0)
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

    def ds_config(self, section: MaskLearnConfig | ContinuedPretrainConfig) -> dict[str, Any]:
        """The stage's DeepSpeed JSON as rank 0 settles it into the stage folder (maskprune.ds_json),
        sent to every rank (no rank on another node reads a file just written on a shared file
        system), with the experiment file's batch and optimizer numbers."""
        from maskprune.dist import broadcast_from_rank0, log
        from maskprune.training import with_experiment_numbers

        ds, error = None, None
        if self.is_rank0:
            try:
                settled = settle(self.stage, self.dir, section.ds_config)
                if settled.refusal:
                    raise DsConfigError(settled.refusal)
                if not frozen_path(self.dir).is_file() or settled.notes:
                    atomic_write_json(frozen_path(self.dir), settled.ds)
                for note in settled.notes:
                    log(note)
                ds = settled.ds
            except DsConfigError as err:
                error = err
        raise_on_every_rank(error, DsConfigError(f"{self.stage}.ds_config: rank 0 could not settle it (see its "
                                                 "message)"))
        return with_experiment_numbers(broadcast_from_rank0(ds), section.train)

    @property
    def tb_dir(self) -> Path:
        return self.run.tb_dir(self.stage)

    def finish(self, outputs: dict[str, Any]) -> None:
        if self.is_rank0:
            self.run.mark_done(self.stage, outputs)


def start_distributed(stage: str, run_dir: str | Path) -> tuple[DistInfo, StageRun]:
    """A distributed stage's start: the process group with the run's launcher.hang_timeout_minutes
    (its progress watchdog armed), then the stage's record."""
    from maskprune.dist import init_distributed

    dist = init_distributed(RunDir(run_dir).load_config().launcher.hang_timeout_minutes)
    return dist, StageRun(stage, run_dir, is_rank0=dist.is_rank0)


def warn_if_fp32_on_gpu(stage: str, ds: dict[str, Any]) -> None:
    """Rank 0 warns a GPU run that its ds_config is the CPU fp32 one (training.precision_warning)."""
    from maskprune.dist import log, on_gpu
    from maskprune.training import precision_warning

    warning = precision_warning(stage, ds, on_gpu())
    if warning:
        log(warning)


def preflight(cfg: ExperimentConfig, run_dir: RunDir, runs: list[StageDecision]) -> None:
    """What `maskprune run` checks before it starts anything (no stage, no rank): the DeepSpeed
    config of each training stage that will run (on a resume, as the stage will settle it:
    maskprune.ds_json) and, when evaluate will run, its task data on disk, so a missing or unusable
    one is one line up front rather than an error hours later."""
    from maskprune.text_corpora import require_on_disk
    from maskprune.zero_shot import require_task_data

    stages = {decision.stage: decision for decision in runs}
    if "evaluate" in stages:  # hours of pruning should not end in "task data missing"
        require_task_data(cfg.evaluate.tasks)
        require_on_disk(cfg.evaluate.heldout_texts)

    for stage in ("mask_learn", "continued_pretrain"):
        if stage in stages:
            section = getattr(cfg, stage)
            try:
                if stages[stage].reason == "resume":
                    settle(stage, run_dir.stage_dir(stage), section.ds_config)
                else:
                    read(resolve(section.ds_config))
            except DsConfigError as err:
                raise ConfigError(f"{stage}.ds_config: {err}") from None


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


# What a bad input raises (a ValueError subclass naming the file/field and the fix, a missing file,
# an unusable run directory): reported in one line, not as a traceback.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RunDirError)


# How long a rank other than 0 waits, on a bad input, for rank 0 to report it (see run_stage).
BAD_INPUT_GRACE_S = 10.0


def run_stage(main: Callable[[], int | None]) -> NoReturn:
    """Every stage script's entry point: `main()`'s exit code, or, on a bad input, the one line
    `maskprune: error: ...` (printed once, by rank 0, or by the one rank that met it) and exit
    code 2. MASKPRUNE_TRACEBACK=1 re-raises instead, for debugging. The process exits at once
    when a launcher of it dies (lifeline.follow_launchers)."""
    from maskprune.watchdog import WATCHDOG

    follow_launchers(sys.argv[0])
    try:
        code = main() or 0
    except BAD_INPUT_ERRORS as err:
        WATCHDOG.disarm()
        if os.environ.get("MASKPRUNE_TRACEBACK"):
            raise
        rank = int(os.environ.get("RANK", "0"))
        if rank != 0:
            # Every rank usually meets the same bad input; rank 0 says it and exits, and the launcher
            # then ends this rank during the wait. Printing at once instead would repeat the line N
            # times, and exiting at once could get rank 0 killed before it printed anything.
            time.sleep(BAD_INPUT_GRACE_S)
        print(f"maskprune: error: {err}" if rank == 0 else f"maskprune: error (rank {rank}): {err}",
              file=sys.stderr, flush=True)
        code = 2
    WATCHDOG.disarm()  # the stage's work is over: exit handlers and teardown take what they take
    # Every rank of a job skips interpreter teardown (dist.exit_rank), whatever its code: a rank
    # that leaves while a peer is alive can abort in the destruction of its gloo connections (-6).
    # On a bad input a peer is always alive then (the others wait BAD_INPUT_GRACE_S): rank 0's
    # abort turned "exit code 2" into 250 (the deepspeed launcher's -6) in a suite run, session 43.
    if _distributed() is not None:
        from maskprune.dist import exit_rank

        exit_rank(code)
    sys.exit(code)

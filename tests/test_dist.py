"""Rank discovery for every launcher the stages run under."""
from __future__ import annotations

import pytest

import maskprune.dist
import maskprune.stage
from helpers import REPO, run_deepspeed
from maskprune.dist import discover_ranks


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}, (3, 1, 8, "RANK")),  # deepspeed, torchrun
    ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}, (5, 1, 16, "SLURM_PROCID")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"},
     (2, 0, 4, "OMPI_COMM_WORLD_RANK")),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 0, 2, "PMI_RANK")),
    # Under srun running the deepspeed launcher, the launcher's own RANK wins over SLURM's.
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (0, 0, 2, "RANK")),
    ({}, (0, 0, 1, "single")),
])
def test_discover_ranks(env: dict[str, str], expected: tuple) -> None:
    assert discover_ranks(env) == expected


@pytest.mark.slow
@pytest.mark.parametrize("failing, line", [
    ("0,1", "maskprune: error: data.seq_len: must be >= 2, got 1"),  # rank 0 says it, once
    ("1", "maskprune: error (rank 1): data.seq_len: must be >= 2, got 1"),  # rank 0 never met it
])
def test_a_bad_input_is_reported_once_whichever_ranks_meet_it(failing: str, line: str) -> None:
    proc = run_deepspeed(REPO / "tests" / "ds_jobs" / "bad_input_job.py", failing, check=False, timeout=300)
    assert proc.returncode != 0
    said = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("maskprune: error")]
    assert said == [line]


def _bad_input() -> int:
    raise ValueError("data.seq_len: must be >= 2, got 1")


class _LeftThroughExitRank(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _record_exit_rank(code: int) -> None:
    raise _LeftThroughExitRank(code)


@pytest.mark.parametrize("main, code", [(lambda: None, 0), (lambda: 3, 3), (_bad_input, 2)],
                         ids=["done", "stopped", "bad_input"])
def test_a_rank_of_a_job_skips_teardown_whatever_its_code(main, code: int, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Rank 0 leaving by sys.exit while a peer still held its gloo connections could abort (-6) in
    # their destruction: a bad input's "exit code 2" reached the orchestrator as 250.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(maskprune.stage, "_distributed", lambda: object())
    monkeypatch.setattr(maskprune.dist, "exit_rank", _record_exit_rank)
    with pytest.raises(_LeftThroughExitRank) as left:
        maskprune.stage.run_stage(main)
    assert left.value.code == code
    assert capsys.readouterr().err == ("maskprune: error: data.seq_len: must be >= 2, got 1\n" if code == 2 else "")


def test_a_single_process_stage_exits_normally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maskprune.stage, "_distributed", lambda: None)
    with pytest.raises(SystemExit) as exited:
        maskprune.stage.run_stage(_bad_input)
    assert exited.value.code == 2

"""Distillation costs no parameter gather: the self-teacher rides along the student's pass.

ZeRO-3 prefetches along the module order it recorded, and the record restarts at every top-level
forward call: a teacher pass of its own alternated two orders, so no trace ever completed and
every parameter was gathered on demand, three times per micro-step. The teacher now runs inside
the student's forward (maskprune/teacher.py) while each layer's parameters are gathered.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import REPO, run_deepspeed

pytestmark = pytest.mark.slow


def test_teacher_adds_no_gather_and_keeps_the_prefetch_trace(tiny_tokenized: Path, tmp_path: Path) -> None:
    run_deepspeed(REPO / "tests" / "ds_jobs" / "teacher_trace_job.py",
                  str(tiny_tokenized / "prepare" / "model"), str(tiny_tokenized / "tokenize"),
                  str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        for name in ("distill", "no_distill"):
            # Step 1 records, from step 2 the trace holds (prefetch on), on every rank.
            assert rank[name]["complete"][1:] == [True, True, True], (name, rank)
        assert rank["distill"]["gathers"] == rank["no_distill"]["gathers"] > 0, rank

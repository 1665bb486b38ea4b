"""ZeRO-3 on CPU with 2 ranks: every parameter is split, each rank holds about half of it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import REPO, run_deepspeed

pytestmark = pytest.mark.slow


def test_each_rank_holds_about_half_of_every_parameter(tiny_prepared: Path, tmp_path: Path) -> None:
    model_dir = tiny_prepared / "prepare" / "model"
    proc = run_deepspeed(REPO / "tests" / "ds_jobs" / "partition_job.py", str(model_dir), str(tmp_path),
                         clean_shm=False)
    # Each rank unlinked its own DeepSpeed all-reduce buffer (69 MB of memory) at exit.
    port = proc.args[proc.args.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 4 * 9 + 3  # 9 tensors a layer
    for name, info in ranks[0].items():
        other = ranks[1][name]
        assert info["full"] == other["full"]
        # Each rank's shard is ceil(numel / 2) (padded), and outside a gather a rank sees nothing.
        assert info["local"] == other["local"] == -(-info["full"] // 2), name
        assert info["visible"] == other["visible"] == 0, name

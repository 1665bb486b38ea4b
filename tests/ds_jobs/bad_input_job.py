"""2-rank job for tests/test_dist.py: a bad input on some ranks only, reported through run_stage.

    deepspeed --num_gpus 2 tests/ds_jobs/bad_input_job.py FAILING_RANKS     (e.g. "1" or "0,1")
"""
import sys

from maskprune.dist import barrier, init_distributed
from maskprune.stage import run_stage


def main() -> int:
    failing = {int(r) for r in [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0].split(",")}
    info = init_distributed(hang_timeout_minutes=2)
    if info.rank in failing:
        raise ValueError("data.seq_len: must be >= 2, got 1")
    barrier()  # a healthy rank waits in the next collective, as a stage would
    return 0


run_stage(main)

"""ZeRO-3 job for tests/test_teacher_trace.py: what the self-teacher costs in parameter gathers.

    deepspeed --num_gpus 2 tests/ds_jobs/teacher_trace_job.py MODEL_DIR DATA_DIR OUT_DIR

Builds two mask learners the way the mask-learn stage does (`assemble_learner`), one distilling
from the dense self-teacher and one not, runs 4 steps of each and writes, per rank: whether
ZeRO-3's parameter coordinator held a complete trace after each step (only then does it
prefetch) and how many all-gathers a fifth step of each issued (counted by the profiler).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from maskprune.config import config_from_dict
from maskprune.data import BatchIterator, TokenShards
from maskprune.dist import init_distributed
from maskprune.mask_learn import MaskLearner, assemble_learner
from maskprune.training import build_zero3_model, load_ds_config

REPO = Path(__file__).resolve().parents[2]


def build(kl_weight: float, args: argparse.Namespace, dist, name: str) -> tuple[MaskLearner, object]:
    cfg = config_from_dict({"target": {"sparsity": 0.5}, "mask_learn": {
        "init": "ones", "distill": {"kl_weight": kl_weight},
        "ds_config": str(REPO / "ds_configs" / "zero3_cpu_fp32.json"),
        "train": {"steps": 1000, "micro_batch_size": 2, "warmup_steps": 0}}})
    ml = cfg.mask_learn
    ds = load_ds_config(ml.ds_config, ml.train)
    model, hf_ds = build_zero3_model(args.model_dir, ds)
    model.config.use_cache = False
    model.requires_grad_(False)
    train_iter = BatchIterator(TokenShards(args.data_dir, "train"), 2, dist.rank, dist.world_size, 0)
    work = Path(args.out_dir) / name
    return assemble_learner(cfg, dist, model, ds, train_iter, TokenShards(args.data_dir, "valid"), None,
                            work, work / "tb", meta={}), hf_ds


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model_dir", "data_dir", "out_dir"):
        parser.add_argument(name)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    dist = init_distributed()
    record = {}
    for name, kl_weight in (("distill", 1.0), ("no_distill", 0.0)):
        learner, _keep_alive = build(kl_weight, args, dist, name)
        coordinator = learner.engine.optimizer.parameter_offload.get_param_coordinator()
        complete = []
        for _ in range(4):
            learner.train_step()
            learner.step += 1
            complete.append(coordinator.is_complete_trace())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            learner.train_step()
        gathers = sum(event.count for event in prof.key_averages() if "allgather" in event.key
                      or "all_gather" in event.key)
        record[name] = {"complete": complete, "gathers": gathers}
    (Path(args.out_dir) / f"rank{dist.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()

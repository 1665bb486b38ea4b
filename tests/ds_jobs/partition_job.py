"""2-rank job: load a model through maskprune's ZeRO-3 path and record each rank's shard sizes.

    deepspeed --num_gpus 2 tests/ds_jobs/partition_job.py MODEL_DIR OUT_DIR
"""
import json
import sys
from pathlib import Path

from maskprune.config import TrainLoopConfig
from maskprune.dist import init_distributed
from maskprune.training import build_zero3_model, load_ds_config

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
model_dir, out_dir = args[0], Path(args[1])
dist = init_distributed()
ds = load_ds_config("ds_configs/zero3_cpu_fp32.json", TrainLoopConfig())
model, hf_ds = build_zero3_model(model_dir, ds)
shards = {name: {"full": int(p.ds_numel), "local": int(p.ds_tensor.numel()), "visible": int(p.numel())}
          for name, p in model.named_parameters()}
(out_dir / f"rank{dist.rank}.json").write_text(json.dumps(shards))

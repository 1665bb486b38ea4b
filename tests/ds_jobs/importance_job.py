"""ZeRO-3 job for tests/test_importance.py: unit scores of every method on a partitioned model.

    deepspeed --num_gpus 2 tests/ds_jobs/importance_job.py MODEL_DIR BATCHES.pt OUT_DIR

BATCHES.pt holds a list of LongTensors; rank r takes batches r, r + world, ... . Each rank writes
OUT_DIR/rank{r}.safetensors with "{bare|engine}.{mode}.{method}.{attn|ffn}" tensors: scored
before and after deepspeed.initialize, in both attention modes, and Taylor's once more with each layer
recomputed in backward (method "taylor_recomputed"); and "{bare|engine}.{mode}.bias.{o_proj|down_proj}":
FLAP's compensation for the FLAP keep indices at 2 units / half the FFN.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from maskprune.arch import LlamaShape
from maskprune.dist import init_distributed
from maskprune.importance import METHODS, flap_bias, unit_scores
from maskprune.masks_io import keep_from_scores

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model_dir", "batches", "out_dir"):
        parser.add_argument(name)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    info = init_distributed(hang_timeout_minutes=5)

    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = json.loads((REPO / "ds_configs" / "zero3_cpu_fp32.json").read_text())
    ds_config["train_micro_batch_size_per_gpu"] = 2
    hf_ds = HfDeepSpeedConfig(ds_config)  # must stay alive: from_pretrained partitions under zero.Init
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()), "not partitioned"
    batches = torch.load(args.batches, weights_only=True)[info.rank::info.world_size]
    shape = LlamaShape.from_hf_config(model.config)
    out = {}

    def score_all(prefix: str, module: torch.nn.Module) -> None:
        for mode in ("query_per_group", "kv_group"):
            for method in METHODS:
                scores = unit_scores(module, batches, method, shape, mode)
                out.update({f"{prefix}.{mode}.{method}.{k}": v for k, v in scores.items()})
            scores = unit_scores(module, batches, "taylor", shape, mode, checkpointing=True)
            out.update({f"{prefix}.{mode}.taylor_recomputed.{k}": v for k, v in scores.items()})
            keep = keep_from_scores(out[f"{prefix}.{mode}.flap.attn"], out[f"{prefix}.{mode}.flap.ffn"], shape,
                                    2, shape.intermediate_size // 2, mode, "flap")
            out.update({f"{prefix}.{mode}.{k}": v for k, v in flap_bias(module, batches, keep).items()})

    # Before any engine exists (as the mask-learn stage scores), then inside one, whose hooks
    # gather the weights instead.
    model.requires_grad_(False)
    score_all("bare", model)
    assert all(p.numel() == 0 for p in model.parameters()), "weights left gathered"
    model.requires_grad_(True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    score_all("engine", engine.module)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    save_file(out, str(Path(args.out_dir) / f"rank{info.rank}.safetensors"))
    del hf_ds


if __name__ == "__main__":
    main()

"""Any maskprune ZeRO-3 checkpoint → a consolidated Hugging Face checkpoint with the uniform architecture.

    python tools/zero_to_hf.py RUN/mask_learn/checkpoints OUT_DIR            # the `latest` tag
    python tools/zero_to_hf.py RUN/mask_learn/checkpoints OUT_DIR --tag step20
    python tools/zero_to_hf.py RUN/continued_pretrain/checkpoints/step30 OUT_DIR
    python tools/zero_to_hf.py --dry-run llama-3-70b --sparsity 0.5        # the export path on paper

mask_learn checkpoints: frozen base weights from the checkpoint's model_dir, LoRA merged from the
checkpoint, masks (its KeepIndices at that step) applied by slicing. continued_pretrain checkpoints:
the (already pruned) model's fp32 weights consolidated, config from model_dir. Parameters are read
one at a time from memory-mapped DeepSpeed files (peak memory near one layer), written as sharded
safetensors, checked against the masked dense model, and published only when complete.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from maskprune.arch import LlamaShape, admissible, attn_unit_count, budget_for_sparsity, human_count

PAPER_CONFIGS = {
    "llama-2-70b": {"vocab_size": 32000, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "llama-3-70b": {"vocab_size": 128256, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
}


def paper_config(name: str) -> dict:
    """The published 70B shapes: 80 layers, hidden 8192, 64 heads over 8 KV heads, FFN 28672."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 28672, "hidden_act": "silu",
            "tie_word_embeddings": False, **PAPER_CONFIGS[name]}


def dry_run(name: str, sparsity: float, mode: str, alignment: int) -> dict:
    from maskprune.export import dry_run as run_on_meta, plan_export
    from maskprune.masks_io import keep_from_scores

    config = paper_config(name)
    shape = LlamaShape.from_hf_config(config)
    # Attention and FFN shrunk alike to the closest legal uniform shape within the budget; which
    # units survive is random here, only shapes matter on paper.
    keep_frac = 1.0 - sparsity
    units, width = admissible(shape, attn_unit_count(shape, mode) * keep_frac, shape.intermediate_size * keep_frac,
                              budget_for_sparsity(shape, sparsity), mode, alignment)
    gen = torch.Generator().manual_seed(0)
    keep = keep_from_scores(torch.rand(shape.num_hidden_layers, attn_unit_count(shape, mode), generator=gen),
                            torch.rand(shape.num_hidden_layers, shape.intermediate_size, generator=gen),
                            shape, units, width, mode, "random")
    started = time.time()
    plan = plan_export(config, keep)
    params = run_on_meta(plan)
    return {"model": name, "attn_mode": mode, "config": LlamaShape.from_hf_config(plan.config).hf_overrides(),
            "params_before": plan.params_before, "params_after": params,
            "human": f"{human_count(plan.params_before)} -> {human_count(params)}",
            "seconds": round(time.time() - started, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="checkpoint root (uses `latest`) or one tag folder")
    parser.add_argument("out", nargs="?", help="output folder (must not be inside the checkpoint)")
    parser.add_argument("--tag", help="tag under the checkpoint root instead of `latest`")
    parser.add_argument("--shard-size-mb", type=int, default=2000, help="largest safetensors shard")
    parser.add_argument("--dtype", default="source", choices=["source", "float32", "bfloat16", "float16"],
                        help="output dtype; source = the model_dir's dtype per tensor")
    parser.add_argument("--equivalence-sequences", type=int, default=4,
                        help="sequences for the built-in equivalence check (0 skips it)")
    parser.add_argument("--equivalence-full-max-mb", type=int, default=4000,
                        help="above this dense fp32 size, sampled layers are checked block by block")
    parser.add_argument("--dry-run", choices=sorted(PAPER_CONFIGS),
                        help="plan the export of a 70B config on the meta device and print it")
    parser.add_argument("--sparsity", type=float, default=0.5, help="--dry-run: fraction pruned")
    parser.add_argument("--attn-mode", default="query_per_group", choices=["query_per_group", "kv_group"])
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            print(json.dumps(dry_run(args.dry_run, args.sparsity, args.attn_mode, 256), indent=2))
            return 0
        if not args.checkpoint or not args.out:
            parser.error("CHECKPOINT and OUT are required (or --dry-run)")
        from maskprune.config import HardPruneConfig
        from maskprune.prune_job import build_pruned_model, job_from_checkpoint

        job = job_from_checkpoint(args.checkpoint, args.tag)
        cfg = HardPruneConfig(shard_size_mb=args.shard_size_mb, dtype=args.dtype,
                              equivalence_sequences=args.equivalence_sequences,
                              equivalence_full_max_mb=args.equivalence_full_max_mb)
        report = build_pruned_model(job, Path(args.out).resolve(), cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"maskprune: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("origin", "config", "params_before", "params_after",
                                             "max_abs_diff")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pruned vs dense forward tokens/s against the FLOP-ideal speed-up.

    .venv/bin/python benchmarks/bench_forward.py [--sparsity 0.2 0.5] [--batch 2 --seq-len 256]

The dense shape is SmolLM2-135M's (30 layers, hidden 576, 9 heads / 3 KV, FFN 1536, vocab 49152,
tied embeddings) unless given; each pruned shape is the uniform one the one-shot baselines cut to
at that target sparsity (`maskprune.targets.one_shot_units`: attn_mode auto, FFN aligned to 64).
Weights are random: speed depends on the shape only. One process, one identical batch; each
repeat times `--steps` passes of every model in turn (`maskprune.evaluation.forward_tokens_per_s`).

Ideal speed-up = matmul FLOPs of the dense forward / those of the pruned one, counted by
`LlamaShape.forward_flops` (the model `target.budget = "flops"` budgets): q/k/v/o, gate/up/down and
the LM head (2 FLOPs per weight per token) plus the causal attention products QK^T and AV (2 * 2 * heads * head_dim per query-key pair, half the square).
Efficiency = measured speed-up / ideal: 1.0 means the pruned model is exactly as much faster as
its smaller matmuls allow; the rest (norms, rotary, softmax, embedding, launch overhead) does not
shrink with pruning and pulls it below 1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pipeline/ is not a package


def build(shape, tie: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape.hf_overrides(), vocab_size=shape.vocab_size, tie_word_embeddings=tie,
                         max_position_embeddings=8192)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv", type=int, default=3)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--untied", action="store_true", help="separate LM head (SmolLM2 ties it)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed passes per model per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from maskprune.arch import LlamaShape, shape_for
    from maskprune.config import config_from_dict
    from maskprune.evaluation import forward_tokens_per_s
    from maskprune.targets import one_shot_units, resolve_target

    dense = LlamaShape(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv,
                       head_dim=args.hidden // args.heads, intermediate_size=args.ffn,
                       tie_word_embeddings=not args.untied)
    shapes = {"dense": dense}
    for sparsity in args.sparsity:
        resolved, cfg = resolve_target(dense, config_from_dict({"target": {"sparsity": sparsity,
                                                                         "ffn_alignment": 64}}))
        shapes[f"pruned {sparsity:.0%}"] = shape_for(resolved, *one_shot_units(resolved, cfg), cfg.target.attn_mode)
    models = {name: build(shape, dense.tie_word_embeddings) for name, shape in shapes.items()}
    # Each repeat times every model in turn, so a drift in machine load hits all of them alike.
    runs = [{name: forward_tokens_per_s(model, dense.vocab_size, args.seq_len, args.batch, args.steps, seed=r)
             for name, model in models.items()} for r in range(args.repeats)]

    dense_flops = dense.forward_flops(args.seq_len)
    print(f"cpu, {torch.get_num_threads()} threads; batch {args.batch} x {args.seq_len}; "
          f"{args.repeats} repeats x {args.steps} passes per model, models in turn")
    print(f"{'model':12s} {'heads/kv/ffn':>13s} {'params':>8s} {'tokens/s':>9s} {'speed-up':>9s} "
          f"{'ideal':>6s} {'efficiency':>10s}")
    result = {}
    for name, shape in shapes.items():
        speed = statistics.median(run[name] for run in runs)
        measured = statistics.median(run[name] / run["dense"] for run in runs)  # paired per repeat
        ideal = dense_flops / shape.forward_flops(args.seq_len)
        result[name] = {"shape": shape.hf_overrides(), "params": shape.param_count(),
                        "tokens_per_s": speed, "speedup": measured, "ideal_speedup": ideal,
                        "efficiency": measured / ideal}
        print(f"{name:12s} {shape.num_attention_heads:>5d}/{shape.num_key_value_heads}/{shape.intermediate_size:<5d} "
              f"{shape.param_count() / 1e6:7.1f}M {speed:9.0f} {measured:8.2f}x {ideal:5.2f}x "
              f"{measured / ideal:10.2f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()

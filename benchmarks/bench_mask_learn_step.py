"""A mask-learn step against a plain LoRA step on the same model and batch shape (goal: <= 1.5x).

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$PWD/.torch_extensions \
        .venv/bin/deepspeed --num_gpus 2 benchmarks/bench_mask_learn_step.py [--rounds 10]

One ZeRO-3 job, four engines over the same random Llama (hidden 512, 8 layers, 8 heads / 4 KV,
FFN 1536, vocab 8192 by default), built as the mask-learn stage builds them:
- mask-learn: `MaskLearner.train_step` itself — student pass with hard masks and the self-teacher
  (masks and LoRA off, no grad) computed alongside, CE + KL backward, engine step, mask-gradient
  all-reduce, `minimax_step` — with distillation (the method as configured) and without it (`distill.kl_weight = 0`, no teacher);
- plain LoRA: student pass, backward, engine step, on an engine with LoRA and no masks;
- a no-grad forward alone (what the teacher cost when it was a pass of its own; it now runs
  inside the student's forward on the same gathered parameters, maskprune/teacher.py).
Each configuration has an engine of its own (as in a stage, where the setting never changes
mid-run): ZeRO-3 prefetches along the module order it recorded, and one engine alternating between
steps with and without a teacher would never keep a trace. Each round times one step of each,
in a rotating order, so load from other jobs on the machine hits every configuration alike; ratios
are taken within a round, then the median over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent

from common import (build_lora_engine, build_mask_learner, llama_config, lora_step,  # noqa: E402
                    save_random_llama, spread, timed, write_token_dataset)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (one step of each config)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--model-dir", help="an HF Llama dir to use instead of a random one (e.g. "
                        "RUN/prepare/model of the demo)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="every configuration recomputes its layers in backward, as the GPU configs do")
    parser.add_argument("--json", action="store_true", help="also print one JSON line (rank 0)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from maskprune.config import config_from_dict
    from maskprune.data import BatchIterator
    from maskprune.dist import barrier, init_distributed, on_gpu

    dist = init_distributed()
    work = Path(tempfile.gettempdir()) / f"maskprune_bench_ml_{os.environ.get('MASTER_PORT', '0')}"
    model_dir = Path(args.model_dir) if args.model_dir else work / "model"
    if dist.is_rank0:
        if not args.model_dir:
            save_random_llama(model_dir, llama_config(args.vocab, args.hidden, args.layers, args.heads,
                                                      args.kv, args.ffn))
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        write_token_dataset(work / "data", vocab, args.seq_len, 64 * args.micro_batch * dist.world_size)
    barrier()
    ds_config = REPO / "ds_configs" / ("zero3_gpu_bf16.json" if on_gpu() else "zero3_cpu_fp32.json")
    cfg_dict: dict[str, Any] = {
        "target": {"sparsity": 0.5},
        # Many steps: the budget warm-up runs as in a real run and the hardening phase never starts.
        "mask_learn": {"ds_config": str(ds_config), "budget_warmup_fraction": 0.0002,
                       "activation_checkpointing": args.activation_checkpointing,
                       "train": {"steps": 100_000, "micro_batch_size": args.micro_batch, "lr": 1e-4,
                                 "warmup_steps": 0}}}
    cfg = config_from_dict(cfg_dict)
    learner, _keep_ml = build_mask_learner(cfg, dist, model_dir, work / "data", work / "ml")
    no_distill_cfg = config_from_dict({**cfg_dict, "mask_learn": {**cfg_dict["mask_learn"],
                                                                  "distill": {"kl_weight": 0.0}}})
    learner_no_distill, _keep_nd = build_mask_learner(no_distill_cfg, dist, model_dir, work / "data", work / "ml_nd")
    lora_engine, _keep_lora = build_lora_engine(cfg, model_dir)
    # Its own iterator over the same shards: the same batch shape and data stream as the learner's.
    lora_batches = BatchIterator(learner.train_iter.ds, args.micro_batch, dist.rank, dist.world_size, seed=0)
    forward_engine, _keep_forward = build_lora_engine(cfg, model_dir)

    def sync() -> None:
        if on_gpu():
            torch.cuda.synchronize()
        barrier()

    def mask_step(run: Any) -> None:
        run.train_step()
        run.step += 1

    def forward_alone() -> None:
        # A no-grad forward of the frozen model alone, on an engine that does nothing else.
        with torch.no_grad():
            forward_engine(input_ids=next(lora_batches).to(dist.device))

    configs = {
        "mask-learn (with distillation)": lambda: mask_step(learner),
        "mask-learn (without distillation)": lambda: mask_step(learner_no_distill),
        "plain LoRA": lambda: lora_step(lora_engine, next(lora_batches).to(dist.device)),
        "no-grad forward alone": forward_alone,
    }
    names = list(configs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(args.warmup + args.rounds):
        shift = round_index % len(names)  # rotate the order: no config always runs right after another
        for name in names[shift:] + names[:shift]:
            seconds = timed(configs[name], sync)
            if round_index >= args.warmup:
                times[name].append(seconds)

    if dist.is_rank0:
        report(args, dist.world_size, times)
        shutil.rmtree(work, ignore_errors=True)
    barrier()


def report(args: argparse.Namespace, world: int, times: dict[str, list[float]]) -> None:
    tokens = args.micro_batch * args.seq_len * world
    with_d, without_d = times["mask-learn (with distillation)"], times["mask-learn (without distillation)"]
    lora, forward = times["plain LoRA"], times["no-grad forward alone"]
    ratio_with = [a / b for a, b in zip(with_d, lora)]
    ratio_without = [a / b for a, b in zip(without_d, lora)]
    share_direct = [f / a for f, a in zip(forward, with_d)]
    share_diff = [(a - b) / a for a, b in zip(with_d, without_d)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu, {world} ranks x {torch.get_num_threads()} thread(s)"
    print(f"\n{device}; batch {args.micro_batch} x {args.seq_len} per rank ({tokens} tokens/step); "
          f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}; "
          f"{args.rounds} rounds after {args.warmup} warm-up; median [min - max]")
    for name, values in times.items():
        print(f"  {name:34s} {spread(values)} s/step  ({tokens / statistics.median(values):,.0f} tokens/s)")
    print(f"ratio mask-learn / plain LoRA, with distillation   : {spread(ratio_with)}  (goal <= 1.5)")
    print(f"ratio mask-learn / plain LoRA, without distillation: {spread(ratio_without)}")
    print(f"teacher share of the mask-learn step, (with - without) / with: {spread(share_diff)}; "
          f"a no-grad forward alone would be {spread(share_direct)} of it")
    verdict = "meets" if statistics.median(ratio_with) <= 1.5 else "MISSES"
    print(f"with distillation the mask-learn step {verdict} the 1.5x goal "
          f"(median {statistics.median(ratio_with):.2f}x)")
    if args.json:
        print(json.dumps({"tokens_per_step": tokens, "seconds": times, "ratio_with_distill": ratio_with,
                          "ratio_without_distill": ratio_without, "teacher_share": share_diff, "forward_share": share_direct}))


if __name__ == "__main__":
    main()

"""Mask-learn and continued-pretrain steps of a >= 1B Llama under ZeRO-3 bf16 on the GPU(s):
tokens/s and peak memory, in a few minutes.

    deepspeed --num_gpus 1 benchmarks/bench_gpu.py                     # TinyLlama-1.1B shape
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 1 benchmarks/bench_gpu.py --cpu-smoke

Rank 0 writes a random Llama (hidden 2048, 22 layers, 32 heads / 8 KV, FFN 5632, vocab 32000: 1.1B
parameters) once to a temp folder in bf16, and a random-token dataset in the tokenize stage's format.
Then, each phase on its own engine, built as its stage builds it (ds_configs/zero3_gpu_bf16.json
with the batch written in):
1. mask-learn: `MaskLearner.train_step` (teacher pass + masked student + LoRA step + minimax);
2. continued-pretrain: `Pretrainer.train_step` (full-parameter AdamW) on the uniform shape the
   one-shot baselines cut the model to at `--sparsity` (random weights of that shape).
Printed per phase: median step time, tokens/s over all ranks, `torch.cuda.max_memory_allocated`
(peak of the phase, per rank) and the host RSS. A phase that fails prints its error and the next
one still runs, so one call on a borrowed GPU always reports what it can.
`--cpu-smoke` runs the same code on a tiny config with the CPU ZeRO-3 config, to check it works.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pipeline/ is not a package
REPO = Path(__file__).resolve().parent.parent

from common import build_mask_learner, llama_config, save_random_llama, timed, write_token_dataset  # noqa: E402
from memory_trace import profile_peak  # noqa: E402

GPU_SHAPE = dict(vocab=32000, hidden=2048, layers=22, heads=32, kv=8, ffn=5632)
SMOKE_SHAPE = dict(vocab=512, hidden=64, layers=2, heads=4, kv=2, ffn=128)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny config on CPU: does it run?")
    parser.add_argument("--layers", type=int, help="override the layer count (e.g. 16)")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--sparsity", type=float, default=0.3, help="pruned shape for continued-pretrain")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                        help="in both training phases (default: on with a GPU, as in the GPU configs)")
    parser.add_argument("--work", help="folder for the model and data (default: a temp folder)")
    parser.add_argument("--fused-adamw", action="store_true",
                        help="torch's fused AdamW (\"fused\": true in the ds_config's optimizer params) "
                             "instead of foreach, whose step makes two fp32 copies of the partition")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="mask-learn's LoRA dropout: the plan counts each adapter's dropped input and "
                             "CUDA's bool mask (3 B per element), asserted on CPU with its 2-byte noise")
    parser.add_argument("--memory-breakdown", action="store_true",
                        help="one more step per phase under torch's memory profiler: what is live at "
                             "the peak, by category and size (memory_trace.py)")
    return parser.parse_args()


def peak_memory() -> str:
    from maskprune.metrics import memory_metrics

    values = memory_metrics()
    gpu = values.get("memory/gpu_peak_allocated_gib")
    return (f"peak GPU allocated {gpu:.2f} GiB, " if gpu is not None else "") + \
        f"host RSS {values['memory/rss_gib']:.2f} GiB"


def run_phase(name: str, step, tokens_per_step: int, args: argparse.Namespace, sync, is_rank0: bool) -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = [timed(step, sync) for _ in range(args.warmup + args.steps)][args.warmup:]
    median = statistics.median(times)
    if is_rank0:
        print(f"{name}: {median:.3f} s/step (min {min(times):.3f}, max {max(times):.3f}), "
              f"{tokens_per_step / median:,.0f} tokens/s, {peak_memory()}", flush=True)
    if args.memory_breakdown:  # every rank runs the step (its collectives); rank 0 prints
        breakdown = profile_peak(step, torch.device("cuda", torch.cuda.current_device())
                                 if torch.cuda.is_available() else torch.device("cpu"))
        if is_rank0:
            print(f"{name.split(' (')[0]}: live at the peak of one profiled step, GiB\n{breakdown}", flush=True)


def release(*engines) -> None:
    """Free one phase's engine before the next phase measures its own peak."""
    for engine in engines:
        engine.destroy()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mask_learn_phase(cfg, dist, work: Path, micro: int, tokens: int, args: argparse.Namespace, sync) -> None:
    learner, _ = build_mask_learner(cfg, dist, work / "dense", work / "data", work / "ml")

    def mask_step() -> None:
        learner.train_step()
        learner.step += 1

    try:
        run_phase("mask-learn (teacher + masked student + LoRA + minimax)", mask_step, tokens, args, sync,
                  dist.is_rank0)
    finally:
        release(learner.engine)


def pretrain_phase(cfg, dist, work: Path, micro: int, tokens: int, args: argparse.Namespace, sync) -> None:
    from maskprune.data import BatchIterator, TokenShards
    from maskprune.pretrain import Pretrainer
    from maskprune.training import Checkpointer, build_zero3_model, init_engine, load_ds_config, prepare_for_training

    cpt = cfg.continued_pretrain
    ds = load_ds_config(cpt.ds_config, cpt.train)
    model, _ = build_zero3_model(work / "pruned", ds)
    prepare_for_training(model, cpt.activation_checkpointing)
    engine = init_engine(model, list(model.parameters()), ds, cpt.train)
    trainer = Pretrainer(
        cfg=cpt, dist=dist, engine=engine, teacher=None,
        train_iter=BatchIterator(TokenShards(work / "data", "train"), micro, dist.rank, dist.world_size, 0),
        valid=TokenShards(work / "data", "valid"), checkpointer=Checkpointer(work / "cpt", 1),
        meta={}, tb_dir=work / "tb", progress_path=work / "progress.json")
    try:
        run_phase("continued-pretrain (full-parameter AdamW, pruned shape)", trainer.train_step, tokens, args,
                  sync, dist.is_rank0)
    finally:
        release(engine)


def main() -> None:
    args = parse_args()
    if args.cpu_smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from maskprune.arch import LlamaShape, human_count, shape_for
    from maskprune.config import config_from_dict
    from maskprune.dist import barrier, init_distributed, on_gpu

    dist = init_distributed()
    gpu = on_gpu()
    shape_args = dict(SMOKE_SHAPE if args.cpu_smoke else GPU_SHAPE)
    if args.layers:
        shape_args["layers"] = args.layers
    micro = args.micro_batch or (2 if args.cpu_smoke else 4)
    seq_len = args.seq_len or (64 if args.cpu_smoke else 2048)
    ds_config = REPO / "ds_configs" / ("zero3_gpu_bf16.json" if gpu else "zero3_cpu_fp32.json")
    dtype = torch.bfloat16 if gpu else torch.float32
    work = Path(args.work or Path(tempfile.gettempdir()) / f"maskprune_bench_gpu_{os.environ.get('MASTER_PORT', '0')}")
    if args.fused_adamw:  # rank 0 writes it; every rank reads it after the barrier below
        fused = work / "ds_config_fused_adamw.json"
        if dist.is_rank0:
            ds = json.loads(ds_config.read_text())
            ds["optimizer"]["params"]["fused"] = True
            work.mkdir(parents=True, exist_ok=True)
            fused.write_text(json.dumps(ds, indent=2))
        ds_config = fused
    train = {"steps": 100_000, "micro_batch_size": micro, "warmup_steps": 0}
    checkpointing = gpu if args.activation_checkpointing is None else args.activation_checkpointing
    cfg = config_from_dict({
        "target": {"sparsity": args.sparsity},
        "mask_learn": {"ds_config": str(ds_config), "activation_checkpointing": checkpointing,
                       "lora": {"dropout": args.lora_dropout}, "train": {**train, "lr": 1e-4}},
        "continued_pretrain": {"ds_config": str(ds_config), "activation_checkpointing": checkpointing,
                               "train": {**train, "lr": 5e-5}}})
    config = llama_config(shape_args["vocab"], shape_args["hidden"], shape_args["layers"],
                          shape_args["heads"], shape_args["kv"], shape_args["ffn"])
    from maskprune.targets import one_shot_units, resolve_target

    dense, cfg = resolve_target(LlamaShape.from_hf_config(config), cfg)
    pruned = shape_for(dense, *one_shot_units(dense, cfg), cfg.target.attn_mode)
    if dist.is_rank0:
        started = time.perf_counter()
        device = "cuda" if gpu else "cpu"
        save_random_llama(work / "dense", config, dtype, device)
        save_random_llama(work / "pruned", llama_config(**{**shape_args, "heads": pruned.num_attention_heads,
                                                           "kv": pruned.num_key_value_heads,
                                                           "ffn": pruned.intermediate_size},
                                                        head_dim=config.head_dim), dtype, device)
        write_token_dataset(work / "data", dense.vocab_size, seq_len, 16 * micro * dist.world_size)
        where = torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} thread(s) per rank)"
        print(f"{where}, {dist.world_size} rank(s), ZeRO-3 {str(dtype).removeprefix('torch.')}; batch "
              f"{micro} x {seq_len} per rank; dense {human_count(dense.param_count())} "
              f"({dense.num_attention_heads}/{dense.num_key_value_heads} heads, FFN {dense.intermediate_size}), "
              f"pruned {human_count(pruned.param_count())} ({pruned.num_attention_heads}/"
              f"{pruned.num_key_value_heads} heads, FFN {pruned.intermediate_size}); models written in "
              f"{time.perf_counter() - started:.0f}s", flush=True)
    barrier()
    tokens = micro * seq_len * dist.world_size

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()
        barrier()

    for name, phase in (("mask-learn", mask_learn_phase), ("continued-pretrain", pretrain_phase)):
        try:
            phase(cfg, dist, work, micro, tokens, args, sync)
        except Exception:  # report and go on: the next phase's figures are still worth the GPU time
            if dist.is_rank0:
                print(f"{name} FAILED:\n{traceback.format_exc(limit=6)}", flush=True)
        # the failed phase's engine is garbage once its frame is: freed here, not counted in the next peak
        release()
    barrier()
    if dist.is_rank0 and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

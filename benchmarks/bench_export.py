"""Hard-prune export: peak memory against the largest layer, time against a plain file copy.

    python benchmarks/bench_export.py                 # 8 layers, ~0.5 GB fp32, in a temp folder
    python benchmarks/bench_export.py --layers 16 --hidden 2048 --json

Builds a random Llama checkpoint tensor by tensor (never whole), copies its shards once (the
floor any export pays: read + write every byte), then runs the full hard-prune job — plan, LoRA-free
slice of 50% of heads and FFN channels, sharded write, block-by-block equivalence check — and
prints peak RSS growth over the pre-export baseline as a multiple of the largest layer and of the
whole model, and export time as a multiple of the copy time. tests/test_export.py asserts the bound.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import torch


def build_source(folder: Path, layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int) -> dict:
    from transformers import LlamaConfig

    from maskprune.export import plan_export
    from maskprune.safetensors_io import ShardedWriter

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn).to_dict()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    specs = plan_export(config, None).specs
    writer = ShardedWriter(folder, [(s.source, s.source_shape, torch.float32) for s in specs], 200 << 20)
    gen = torch.Generator().manual_seed(0)
    for spec in specs:  # one tensor alive at a time
        scale = 1.0 if spec.source.endswith("norm.weight") else spec.source_shape[-1] ** -0.5
        writer.write(spec.source, torch.randn(spec.source_shape, generator=gen) * scale)
    writer.close()
    layer_bytes = sum(4 * torch.Size(s.source_shape).numel() for s in specs if s.source.startswith("model.layers.0."))
    return {"model_bytes": writer.total_bytes, "largest_layer_bytes": layer_bytes,
            "largest_tensor_bytes": max(4 * torch.Size(s.source_shape).numel() for s in specs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dir", help="work folder (default: a temp folder, removed afterwards)")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args()

    from maskprune.arch import LlamaShape
    from maskprune.config import HardPruneConfig
    from maskprune.masks_io import keep_from_scores, save_keep_indices
    from maskprune.prune_job import build_pruned_model, job_from_model_dir

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_export_"))
    try:
        sizes = build_source(work / "source", args.layers, args.hidden, args.heads, args.kv, args.ffn, args.vocab)
        shape = LlamaShape.from_hf_config(json.loads((work / "source" / "config.json").read_text()))
        gen = torch.Generator().manual_seed(1)
        keep = keep_from_scores(torch.rand(args.layers, args.heads, generator=gen),
                                torch.rand(args.layers, args.ffn, generator=gen), shape,
                                args.heads // 2, args.ffn // 2, "query_per_group", "random")
        save_keep_indices(work / "masks.safetensors", keep)

        started = time.perf_counter()
        (work / "copy").mkdir()
        for shard in sorted((work / "source").glob("*.safetensors")):
            shutil.copyfile(shard, work / "copy" / shard.name)
        copy_s = time.perf_counter() - started

        job = job_from_model_dir(work / "source", work / "masks.safetensors")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak (VmHWM): building the source is not the export's
        baseline = psutil.Process().memory_info().rss
        started = time.perf_counter()
        report = build_pruned_model(job, work / "pruned", HardPruneConfig(
            shard_size_mb=200, equivalence_full_max_mb=0, equivalence_layers=2), progress=False)
        export_s = time.perf_counter() - started
        peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                    if line.startswith("VmHWM"))
        growth = peak - baseline
        result = {**sizes, "baseline_rss": baseline, "peak_rss": peak, "peak_growth": growth,
                  "growth_per_layer": round(growth / sizes["largest_layer_bytes"], 3),
                  "growth_per_model": round(growth / sizes["model_bytes"], 3),
                  "copy_s": round(copy_s, 3), "export_s": round(export_s, 3),
                  "time_ratio": round(export_s / copy_s, 2), "write_s": report["seconds"]["write"],
                  "write_ratio": round(report["seconds"]["write"] / copy_s, 2),
                  "max_abs_diff": report["max_abs_diff"]}
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    mib = 1 << 20
    print(f"model {result['model_bytes'] / mib:.0f} MiB, largest layer {result['largest_layer_bytes'] / mib:.0f} MiB")
    print(f"peak RSS growth {growth / mib:.0f} MiB = {result['growth_per_layer']}x largest layer "
          f"= {result['growth_per_model']}x whole model")
    print(f"export {export_s:.2f}s (of which writing {result['write_s']}s) vs copy {copy_s:.2f}s = "
          f"{result['time_ratio']}x ({result['write_ratio']}x writing only); "
          f"equivalence (blocks) max |diff| {result['max_abs_diff']}")


if __name__ == "__main__":
    main()

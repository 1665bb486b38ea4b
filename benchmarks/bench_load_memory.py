"""Per-rank peak anonymous memory (RssAnon) while loading a model under ZeRO-3: the streaming
loader (`training.build_zero3_model`) against transformers' from_pretrained under HfDeepSpeedConfig.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$PWD/.torch_extensions \
        .venv/bin/python benchmarks/bench_load_memory.py [--ranks 4] [--model-dir DIR] [--json]

Without --model-dir a random 420M-parameter Llama (1.68 GB fp32, 4 shards) is saved to a temporary
folder first. Both loads run as `deepspeed --num_gpus N tests/ds_jobs/stream_load_job.py`, which
samples each rank's RssAnon every 10 ms; the baseline is the rank's RssAnon after importing
deepspeed, transformers and the Llama code and init_distributed. Memory does not depend on the
machine's load, so the two runs go one after the other.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import run_deepspeed  # noqa: E402
from test_zero_load import BIG_LLAMA, JOB, save_random_llama  # noqa: E402


def measure(model_dir: Path, mode: str, ranks: int, ds_config: str) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as out:
        run_deepspeed(JOB, str(model_dir), out, mode, ds_config, ranks=ranks, timeout=3600)
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--ds-config", default="ds_configs/zero3_cpu_fp32.json")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or save_random_llama(Path(scratch) / "llama", "500MB", **BIG_LLAMA)
        total = json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"] \
            if (model_dir / "model.safetensors.index.json").is_file() \
            else sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        results = {mode: measure(model_dir, mode, args.ranks, args.ds_config)
                   for mode in ("memory_from_pretrained", "memory")}
    if args.json:
        print(json.dumps({"model_bytes": total, **results}))
        return
    gib = 1 << 30
    print(f"model {total / gib:.2f} GiB, {args.ranks} ranks, partition {total / args.ranks / gib:.2f} GiB")
    for mode, label in (("memory_from_pretrained", "from_pretrained"), ("memory", "streaming")):
        for rank, info in enumerate(results[mode]):
            above = info["peak"] - info["baseline"]
            print(f"{label:>15} rank {rank}: peak RssAnon {info['peak'] / gib:.2f} GiB, baseline "
                  f"{info['baseline'] / gib:.2f} GiB, above baseline {above / gib:.2f} GiB "
                  f"= {above / total:.2f}x the model, load {info['seconds']:.0f} s")
    old = max(i["peak"] - i["baseline"] for i in results["memory_from_pretrained"])
    new = max(i["peak"] - i["baseline"] for i in results["memory"])
    print(f"largest rank above baseline: streaming / from_pretrained = {new / old:.2f}")


if __name__ == "__main__":
    main()

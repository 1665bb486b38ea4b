"""More ranks than cores, and a lost node: configs/tiny.toml's two training stages on 16 ZeRO-3 CPU
ranks, then each resumed on 8 from its middle checkpoint (as after losing one of two 8-GPU nodes),
beside the same run on 2 ranks.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$PWD/.torch_extensions \
        .venv/bin/python benchmarks/bench_ranks.py [--ranks 16] [--resume-ranks 8] [--work DIR]

The test suite resumes 2-rank checkpoints on 1 and 4 ranks; a 70B job writes 64 ranks' files and
resumes on 56. What depends on the rank count (the data order split over micro x world, the
universal conversion of every rank's optimizer fragments, grad_accum rescaled to keep the global
batch, the waiting ranks around rank 0's conversion) runs here with 8x more ranks than cores.
Printed: wall time of each run against 2 ranks, and the resumed steps' losses against the
uninterrupted 16-rank run's (the same global batches, summed in another order).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import copy_run  # noqa: E402
from helpers import run_cli  # noqa: E402
from test_universal_resume import STAGES, cut_back, losses, run_argv  # noqa: E402

LOSS_TAG = {"mask_learn": "loss/total", "continued_pretrain": "loss/train"}


def timed_run(run_dir: Path, until: str, ranks: int, *settings: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = run_cli(*run_argv(run_dir, until, ranks), *[x for s in settings for x in ("--set", s)],
                  timeout=7200).stdout
    return time.perf_counter() - start, out


def worst_relative_difference(got: dict[int, float], expected: dict[int, float]) -> float:
    return max(abs(got[s] - expected[s]) / abs(expected[s]) for s in got)


def same_masks(run_a: Path, run_b: Path) -> bool:
    a, b = (load_file(str(r / "mask_learn" / "masks.safetensors")) for r in (run_a, run_b))
    return all(torch.equal(a[k], b[k]) for k in ("keep.q_heads", "keep.kv_heads", "keep.ffn"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=16)
    parser.add_argument("--resume-ranks", type=int, default=8)
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        base = work / "base"
        run_cli("run", "configs/tiny.toml", "--run-dir", str(base), "--until", "tokenize", timeout=1800)
        seconds = {}
        for ranks in (2, args.ranks):
            # The same global batch (micro 1 x grad_accum x ranks) on both, so the same sequences.
            accum = [f"{stage}.train.grad_accum={2 * args.ranks // ranks}" for stage in STAGES]
            seconds[ranks], _ = timed_run(copy_run(base, work / f"ranks{ranks}"), "continued_pretrain", ranks, *accum)
            print(f"{ranks} ranks: mask_learn {STAGES['mask_learn']} + continued_pretrain "
                  f"{STAGES['continued_pretrain']} steps of {2 * args.ranks} sequences in {seconds[ranks]:.0f} s",
                  flush=True)
        print(f"{args.ranks} / 2 ranks wall time: {seconds[args.ranks] / seconds[2]:.2f}x")
        uninterrupted = work / f"ranks{args.ranks}"
        for stage in STAGES:
            worst = worst_relative_difference(losses(uninterrupted / "tb" / stage, LOSS_TAG[stage]),
                                              losses(work / "ranks2" / "tb" / stage, LOSS_TAG[stage]))
            print(f"{stage}: {args.ranks} ranks against 2, every step's loss: largest relative difference {worst:.1e}")
        print(f"  final masks equal: {same_masks(uninterrupted, work / 'ranks2')}")
        for stage in STAGES:
            run_dir, middle = cut_back(uninterrupted, stage, work / f"resume_{stage}")
            elapsed, out = timed_run(run_dir, stage, args.resume_ranks)
            converted = f"written by {args.ranks} ranks, resuming on {args.resume_ranks}" in out
            accum = next((line.strip() for line in out.splitlines() if "keeping the global batch" in line), "?")
            got = losses(run_dir / "tb" / stage, LOSS_TAG[stage])
            resumed = sorted(got)
            worst = worst_relative_difference(got, losses(uninterrupted / "tb" / stage, LOSS_TAG[stage]))
            print(f"{stage}: died after {middle}, resumed on {args.resume_ranks} ranks in {elapsed:.0f} s "
                  f"(universal conversion: {'yes' if converted else 'NO'}; {accum.split('] ')[-1]}); steps "
                  f"{resumed[0]}-{resumed[-1]}: largest relative loss difference to the uninterrupted run {worst:.1e}")
            if stage == "mask_learn":
                print(f"  final masks equal to the uninterrupted run's: {same_masks(uninterrupted, run_dir)}")


if __name__ == "__main__":
    main()

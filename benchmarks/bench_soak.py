"""Long-run soak: configs/tiny.toml's mask_learn and continued_pretrain for about 30 minutes each on
2 ZeRO-3 CPU ranks, with every rank's anonymous memory, open files and threads sampled over time,
throughput from TensorBoard, and the checkpoints and event files on disk.

    .venv/bin/python benchmarks/bench_soak.py --run-dir DIR [--mask-learn-steps 18000] [--cpt-steps 36000]
        [--json F]      # the ranks get OMP_NUM_THREADS=1 and DS_ACCELERATOR=cpu (tests/helpers.cpu_env)

A 70B stage runs for hours: what grows per step (a tensor kept, a file or thread opened per epoch or
per checkpoint) is invisible in the test suite's 40-step runs and fatal there. A step of the tiny
model takes 0.05-0.1 s, so the default hour runs the per-step code 54,000 times (a 70B job: 3,200
steps), crosses an epoch boundary every ~390 steps and saves 54 checkpoints. RssAnon is what a leak
grows; RSS also counts pages of the memory-mapped token shards and the shared-memory all-reduce
buffers, which the kernel can drop or which never grow. The first 10% of a stage's steps are warm-up
(allocator pools, the first checkpoint's buffers) and left out of the growth figures.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import cpu_env, run_processes  # noqa: E402
from maskprune.rundir import disk_bytes  # noqa: E402

STAGES = ("mask_learn", "continued_pretrain")
STEP_LINE = re.compile(rb"\] (mask_learn|continued_pretrain) step (\d+)/(\d+) ")
WARMUP_FRACTION = 0.1


@dataclass
class Sample:
    seconds: float
    stage: str
    step: int
    rank: int
    rss_anon: int
    rss: int
    fds: int
    threads: int


def rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no RssAnon in /proc/{pid}/status")


def rank_processes(run_dir: Path) -> dict[tuple[str, int], psutil.Process]:
    """The live rank processes of the run, keyed by (stage, local rank)."""
    ranks = {}
    for proc in run_processes(run_dir):
        try:
            cmdline = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        script = next((Path(a).stem for a in cmdline if a.endswith(".py") and "stage_" in a), None)
        local = next((a.split("=", 1)[1] for a in cmdline if a.startswith("--local_rank=")), None)
        if script and local is not None:
            ranks[(script.removeprefix("stage_"), int(local))] = proc
    return ranks


class LogFollower:
    """The newest `STAGE step N/M` in the driver's log, reading only what was appended."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.stage, self.step = path, 0, "", 0

    def poll(self) -> None:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            chunk = log.read()
        cut = chunk.rfind(b"\n") + 1  # a half-written line waits for the next poll
        self.offset += cut
        for match in STEP_LINE.finditer(chunk[:cut]):
            self.stage, self.step = match.group(1).decode(), int(match.group(2))


def soak(run_dir: Path, log_path: Path, steps: dict[str, int], every: int, interval: float) -> list[Sample]:
    overrides = []
    for stage in STAGES:
        overrides += ["--set", f"{stage}.train.steps={steps[stage]}",
                      "--set", f"{stage}.train.checkpoint_every={every}",
                      "--set", f"{stage}.train.eval_every={every}"]
    argv = [str(REPO / ".venv" / "bin" / "maskprune"), "run", "configs/tiny.toml", "--run-dir", str(run_dir),
            "--until", "continued_pretrain", *overrides]
    samples: list[Sample] = []
    start = time.monotonic()
    with log_path.open("wb") as log:
        driver = subprocess.Popen(argv, cwd=REPO, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT)
    follower = LogFollower(log_path)
    while driver.poll() is None:
        follower.poll()
        for (stage, rank), proc in rank_processes(run_dir).items():
            try:
                with proc.oneshot():
                    sample = Sample(time.monotonic() - start, stage, follower.step if follower.stage == stage else 0,
                                    rank, rss_anon(proc.pid), proc.memory_info().rss, proc.num_fds(),
                                    proc.num_threads())
            except (psutil.NoSuchProcess, FileNotFoundError, ValueError):
                continue  # the rank ended between the listing and the read
            samples.append(sample)
        time.sleep(interval)
    if driver.returncode != 0:
        raise SystemExit(f"the soak run failed ({driver.returncode}); its log: {log_path}")
    return samples


def slope_per_1000_steps(points: list[tuple[int, int]]) -> float:
    """Least-squares bytes per 1,000 steps."""
    steps, values = zip(*points)
    return 1000 * statistics.linear_regression(steps, values).slope


def throughput_by_tenth(run_dir: Path, stage: str, total: int) -> list[float]:
    """Median tokens/s of each tenth of the stage's steps (the first step, which builds ZeRO-3's
    prefetch trace, left out; the median leaves out the checkpoint and evaluation steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb" / stage), size_guidance={"scalars": 0})
    events.Reload()
    rates = [(e.step, e.value) for e in events.Scalars("throughput/tokens_per_s") if e.step > 1]
    return [statistics.median_high([v for s, v in rates if tenth * total < 10 * s <= (tenth + 1) * total])
            for tenth in range(10)]


def report(run_dir: Path, samples: list[Sample], steps: dict[str, int], every: int) -> dict:
    results: dict = {}
    for stage in STAGES:
        total = steps[stage]
        stage_samples = [s for s in samples if s.stage == stage and s.step > 0]
        minutes = (max(s.seconds for s in stage_samples) - min(s.seconds for s in stage_samples)) / 60
        per_rank = {}
        for rank in sorted({s.rank for s in stage_samples}):
            mine = [s for s in stage_samples if s.rank == rank and s.step >= WARMUP_FRACTION * total]
            # Medians of the second and the last tenth: single samples swing by ~20 MiB (a save, an eval).
            start = statistics.median_high([s.rss_anon for s in mine if s.step < 2 * WARMUP_FRACTION * total])
            end = statistics.median_high([s.rss_anon for s in mine if s.step >= (1 - WARMUP_FRACTION) * total])
            per_rank[rank] = {
                "rss_anon_start_mib": start / 2**20, "rss_anon_end_mib": end / 2**20,
                "rss_anon_max_mib": max(s.rss_anon for s in mine) / 2**20,
                "rss_anon_kib_per_1000_steps": slope_per_1000_steps([(s.step, s.rss_anon) for s in mine]) / 1024,
                "rss_end_mib": mine[-1].rss / 2**20,
                "fds": [min(s.fds for s in mine), max(s.fds for s in mine)],
                "threads": [min(s.threads for s in mine), max(s.threads for s in mine)],
                "samples": len(mine)}
        checkpoints = run_dir / stage / "checkpoints"
        results[stage] = {
            "steps": total, "minutes": minutes, "ranks": per_rank,
            "tokens_per_s_by_tenth": throughput_by_tenth(run_dir, stage, total),
            "checkpoint_saves": total // every,
            "checkpoints_kept": sorted(p.name for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step")),
            "checkpoints_bytes": disk_bytes(checkpoints),
            "tb_bytes_per_1000_steps": disk_bytes(run_dir / "tb" / stage) * 1000 / total}
    return results


def print_report(results: dict) -> None:
    for stage, r in results.items():
        print(f"{stage}: {r['steps']:,} steps in {r['minutes']:.1f} min, {r['checkpoint_saves']} checkpoint saves "
              f"(kept {', '.join(r['checkpoints_kept'])}: {r['checkpoints_bytes'] / 2**20:.1f} MiB), "
              f"TensorBoard {r['tb_bytes_per_1000_steps'] / 1024:.1f} KiB per 1,000 steps")
        rates = r["tokens_per_s_by_tenth"]
        print(f"  tokens/s, median of each tenth of the steps: {' '.join(f'{v:.0f}' for v in rates)}; "
              f"last / first = {rates[-1] / rates[0]:.2f}x")
        for rank, m in r["ranks"].items():
            print(f"  rank {rank}: RssAnon (median) {m['rss_anon_start_mib']:.1f} MiB in the second tenth -> "
                  f"{m['rss_anon_end_mib']:.1f} in the last = {m['rss_anon_end_mib'] / m['rss_anon_start_mib']:.3f}x "
                  f"(max {m['rss_anon_max_mib']:.1f}), "
                  f"fit {m['rss_anon_kib_per_1000_steps']:+.1f} KiB per 1,000 steps; open files "
                  f"{m['fds'][0]}-{m['fds'][1]}, threads {m['threads'][0]}-{m['threads'][1]}; "
                  f"{m['samples']} samples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mask-learn-steps", type=int, default=18_000)
    parser.add_argument("--cpt-steps", type=int, default=36_000)
    parser.add_argument("--checkpoint-every", type=int, default=1_000)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--run-dir", type=Path, required=True, help="a new folder (the run keeps its log there)")
    parser.add_argument("--json", type=Path, help="also write the figures and every sample here")
    args = parser.parse_args()
    if args.run_dir.exists():
        raise SystemExit(f"--run-dir {args.run_dir} exists: give a new folder (the soak starts from scratch)")
    args.run_dir.mkdir(parents=True)
    steps = {"mask_learn": args.mask_learn_steps, "continued_pretrain": args.cpt_steps}
    samples = soak(args.run_dir, args.run_dir / "soak.log", steps, args.checkpoint_every, args.interval)
    results = report(args.run_dir, samples, steps, args.checkpoint_every)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "samples": [asdict(s) for s in samples]}))


if __name__ == "__main__":
    main()

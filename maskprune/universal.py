"""Resuming a ZeRO-3 checkpoint on a different number of ranks, through DeepSpeed universal checkpoints.

    python -m maskprune.universal RUN/mask_learn/checkpoints [--tag step00000040] [--workers 8]

A ZeRO-3 checkpoint holds each rank's flat slice of the fp32 weights and Adam moments, so it loads
only on the world size that wrote it. `ds_to_universal` merges the slices into one file per
parameter and state (`universal/<tag>/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt`), which any world
size re-partitions on load. The conversion goes into a sibling folder (staged, then renamed), never
touches the original, is refused before writing where the disk has no room for it, and is done
once: a resume finds it ready. The command above runs it as its own step (parallel workers, no
distributed job waiting); a resume that finds no conversion makes one on
rank 0 (one worker) while the other ranks wait: rank 0 pets its watchdog while its conversion reads or
writes (a 70B conversion outlasts any hang timeout) and bumps a heartbeat file the waiting ranks
follow, so the job fails only when the conversion stops moving.

What carries over and how:
- Trained parameters and their optimizer state: the universal form. Only parameters the optimizer
  holds are in it: mask_learn's frozen base weights are excluded from its checkpoints and come, as
  on every resume, from the model the stage starts from.
- Masks, dual variables, target dims, hardening masks: rank 0's `maskprune_state.safetensors`
  (replicated on every rank, independent of the world size).
- Data position: one global sample count (maskprune/data.py), so the same samples follow in the same
  order. The global batch (micro x grad_accum x ranks) is kept: grad_accum is recomputed for the new
  world size (`grad_accum_for_resume`), and a world size that cannot reach the checkpoint's global
  batch with this micro batch is refused with the numbers to use.
- RNG: per-rank generator states have no counterpart on another world size; each rank is reseeded
  from (seed, step, rank). The training losses therefore continue within floating-point tolerance
  (the gradient sums run in another order), not bit-identically as on the same world size.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from maskprune.config import TrainLoopConfig
from maskprune.dist import barrier, broadcast_from_rank0, log, rank
from maskprune.rundir import atomic_write_text, human_bytes
from maskprune.safe_load import refusal_explained, tensors_only
from maskprune.training import (COMPLETE_MARKER, META_FILE, ROOM_MARGIN, UNIVERSAL_DIR, Checkpointer, CheckpointError,
                                CheckpointSpaceError)
from maskprune.watchdog import WATCHDOG

HEARTBEAT_S = 10.0  # how often rank 0 looks at its I/O and bumps the heartbeat
POLL_S = 2.0  # how often a waiting rank looks for the finished folder and the heartbeat
# Filesystem blocks of the thousands of small fragment files (one per parameter, rank and state).
FRAGMENT_ALLOWANCE = 4 << 20


def universal_folder(checkpoint: Path) -> Path:
    """Where the universal form of checkpoint folder `root/<tag>` lives: `root/universal/<tag>`."""
    return checkpoint.parent / UNIVERSAL_DIR / checkpoint.name


def conversion_bytes(checkpoint: Path) -> int:
    """Disk a conversion of `checkpoint` takes at its peak. ds_to_universal cuts every rank's
    optimizer states into per-parameter fragments in a temp folder, merges them into one file per
    parameter and state, and removes the fragments only at the end, so both copies exist at once;
    it also copies rank 0's whole optimizer file. Measured on 2 ranks, 7.3M parameters: 220.4 MB
    estimated, 220.9 MB written."""
    optim = [p.stat().st_size for p in checkpoint.glob("*_optim_states.pt")]
    return 2 * sum(optim) + max(optim, default=0)


def check_room(checkpoint: Path) -> None:
    """Refuse, before writing, a conversion its filesystem (the checkpoint's: the output goes beside
    it) has no room for: a 70B's runs for hours and would otherwise die on a full disk near its end."""
    need = ROOM_MARGIN * conversion_bytes(checkpoint) + FRAGMENT_ALLOWANCE
    free = shutil.disk_usage(checkpoint.parent).free
    if free < need:
        meta = checkpoint / META_FILE
        writers = json.loads(meta.read_text()).get("world_size", "") if meta.is_file() else ""
        raise CheckpointSpaceError(
            f"{checkpoint.parent}: {human_bytes(free)} free, and converting {checkpoint} to its universal form "
            f"(to resume on another number of ranks) needs ~{human_bytes(need)} (twice its optimizer states "
            f"while the conversion's fragments and its output both exist, plus rank 0's optimizer file). "
            f"Nothing was written; free space there, or resume on the {writers or 'same number of'} ranks that "
            f"wrote it (no conversion needed), then rerun")


def convert(checkpoint: Path, workers: int = 1) -> Path:
    """The universal form of `checkpoint`, made if missing: staged in a `.partial` folder and renamed,
    so a kill mid-conversion leaves nothing that is taken for a finished one."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = universal_folder(checkpoint)
    if (out / COMPLETE_MARKER).is_file():
        return out
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    check_room(checkpoint)
    staging.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(staging),
                              num_extract_workers=workers, num_merge_workers=workers,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)
    tensors_only()  # ds_to_universal unpickles with weights_only=False (maskprune.safe_load)
    with refusal_explained(checkpoint):
        ds_to_universal(args)
    # ds_to_universal points a `latest_universal` file at its output folder; we always load by tag.
    (staging.parent / "latest_universal").unlink(missing_ok=True)
    (staging / COMPLETE_MARKER).write_text(f"{checkpoint.name}\n")
    staging.rename(out)
    return out


def convert_on_rank0(checkpoint: Path) -> Path:
    """`convert` run by rank 0 alone while the other ranks wait; every rank gets the folder. The
    others wait outside any collective (a 70B conversion outlasts the process group's timeout) for
    the finished folder, following rank 0's heartbeat."""
    out = universal_folder(checkpoint)
    heartbeat = out.with_name(f".{out.name}.heartbeat")
    if rank() == 0:
        if not (out / COMPLETE_MARKER).is_file():
            log(f"converting {checkpoint} to a universal checkpoint in {out} (one worker; "
                f"`python -m maskprune.universal {checkpoint.parent}` does it beforehand, in parallel)")
            with reporting_progress(heartbeat, f"universal conversion of {checkpoint}"):
                convert(checkpoint)
    else:
        wait_following(out / COMPLETE_MARKER, heartbeat, f"rank 0's universal conversion of {checkpoint}")
    barrier()
    if rank() == 0:
        heartbeat.unlink(missing_ok=True)
    return out


def io_bytes() -> int:
    """Bytes this process and its workers have written (to any file) and read from storage so far.
    Not bytes read from the page cache or /proc: looking at these counters reads /proc itself."""
    total = 0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            counters = proc.io_counters()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += counters.write_chars + counters.read_bytes
    return total


@contextmanager
def reporting_progress(heartbeat: Path, what: str, interval_s: float = HEARTBEAT_S) -> Iterator[None]:
    """While the body runs: every `interval_s`, if this process tree's I/O moved, pet the watchdog
    and bump `heartbeat`; a body that stops reading and writing lets the watchdog fire."""
    stop = threading.Event()

    def watch() -> None:
        last, beats = io_bytes(), 0
        while not stop.wait(interval_s):
            now = io_bytes()
            if now != last:
                beats += 1
                WATCHDOG.pet(f"{what}: {now >> 20} MiB read and written")
                atomic_write_text(heartbeat, f"{beats}\n")
                last = io_bytes()  # after the heartbeat's own bytes, or it would keep itself alive

    heartbeat.parent.mkdir(parents=True, exist_ok=True)
    thread = threading.Thread(target=watch, name="maskprune-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def wait_following(done: Path, heartbeat: Path, what: str, interval_s: float = POLL_S) -> None:
    """Return once `done` exists, petting the watchdog each time `heartbeat` changes."""
    seen = None
    while not done.is_file():
        beat = heartbeat.read_text() if heartbeat.is_file() else None
        if beat != seen:
            seen = beat
            WATCHDOG.pet(f"waiting for {what}")
        time.sleep(interval_s)


def grad_accum_for_resume(root: Path, train: TrainLoopConfig, world_size: int) -> int:
    """The grad_accum that keeps the newest complete checkpoint's global batch on `world_size` ranks
    (train.grad_accum when nothing is resumed or the world size is the checkpoint's)."""
    # Rank 0 lists the folder, as Checkpointer.resume does: ranks that saw different tags mid-save
    # would pick different grad_accum values and hang in their first collective.
    tag = broadcast_from_rank0(Checkpointer(root, 1).latest()
                               if train.resume == "auto" and rank() == 0 else None)
    if tag is None:
        return train.grad_accum
    meta = json.loads((root / tag / META_FILE).read_text())
    if meta["world_size"] == world_size or "train_batch_size" not in meta:
        return train.grad_accum
    global_batch = int(meta["train_batch_size"])
    per_accum = train.micro_batch_size * world_size
    if global_batch % per_accum:
        raise CheckpointError(
            f"{root / tag}: written by {meta['world_size']} ranks with a global batch of {global_batch} "
            f"sequences; {world_size} ranks x micro_batch_size {train.micro_batch_size} cannot make it up "
            f"({global_batch} is not a multiple of {per_accum}); resume on a number of ranks that divides "
            f"{global_batch // train.micro_batch_size}, or set micro_batch_size so that micro_batch_size x "
            f"ranks divides {global_batch}")
    accum = global_batch // per_accum
    if accum != train.grad_accum:
        log(f"resuming {root / tag} ({meta['world_size']} ranks) on {world_size} ranks: grad_accum "
            f"{train.grad_accum} -> {accum}, keeping the global batch of {global_batch} sequences")
    return accum


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a stage's checkpoint to the universal form, "
                                     "ready for a resume on another number of ranks.")
    parser.add_argument("checkpoints", type=Path, help="a stage's checkpoints folder, e.g. RUN/mask_learn/checkpoints")
    parser.add_argument("--tag", help="the checkpoint to convert (default: the newest complete one)")
    parser.add_argument("--workers", type=int, default=4, help="parallel processes (default 4)")
    args = parser.parse_args(argv)
    tag = args.tag or Checkpointer(args.checkpoints, 1).latest()
    if tag is None or not (args.checkpoints / tag / COMPLETE_MARKER).is_file():
        print(f"maskprune.universal: error: no complete checkpoint {tag or ''} in {args.checkpoints}; "
              "name a folder holding step*/COMPLETE", file=sys.stderr)
        return 2
    try:
        out = convert(args.checkpoints / tag, workers=args.workers)
    except CheckpointSpaceError as err:
        print(f"maskprune.universal: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.checkpoints / tag} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

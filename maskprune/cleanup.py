"""Training checkpoints that no stage will read again, and removing them (`maskprune clean`).

    maskprune clean runs/llama70b --dry-run   # what would go, and its size
    maskprune clean runs/llama70b             # mask_learn's checkpoints, continued_pretrain's older ones
    maskprune clean runs/llama70b --final     # also continued_pretrain's last one, once export is done

At 70B one continued_pretrain checkpoint (ZeRO-3 shards of bf16 weights, fp32 master weights and
Adam moments) is about a terabyte and `keep_last = 2` leaves two behind, beside mask_learn's own.
Once a stage is done nothing resumes from its checkpoints: hard_prune reads mask_learn's masks and
adapters (files beside its checkpoints), and only export reads continued_pretrain's final checkpoint.
So that one stays unless --final, and after --final an export re-run is refused (rundir.plan) until
continued_pretrain runs again. Only folders inside the run directory are removed: a run dir copied
from another (the benchmarks do that) reads its finished stages' outputs where they are, and those
belong to the other run.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from maskprune.rundir import FINAL_CHECKPOINT_REMOVED, RunDir, RunDirError, disk_bytes
from maskprune.training import UNIVERSAL_DIR


@dataclass(frozen=True)
class Removal:
    stage: str
    path: Path
    size: int  # bytes


def _own(run_dir: RunDir, path: Path) -> bool:
    return path.exists() and path.resolve().is_relative_to(run_dir.root.resolve())


def removable(run_dir: RunDir, final: bool) -> list[Removal]:
    """What `clean` removes, in order; refused (RunDirError) when --final would take the checkpoint
    export has not yet been written from."""
    found: list[tuple[str, Path]] = []
    if run_dir.state("mask_learn").status == "done":
        found.append(("mask_learn", run_dir.stage_dir("mask_learn") / "checkpoints"))
    cpt = run_dir.state("continued_pretrain")
    if cpt.status == "done" and cpt.outputs and "checkpoints" in cpt.outputs:
        root, final_tag = Path(cpt.outputs["checkpoints"]), cpt.outputs["final_tag"]
        if final:
            if run_dir.state("export").status != "done":
                raise RunDirError("clean --final: export has not been written from continued_pretrain's final "
                                  f"checkpoint ({root / final_tag}) yet; run the pipeline to the end first, or "
                                  "clean without --final")
            found.append(("continued_pretrain", root))
        else:  # a universal (any-world-size) copy only serves a resume, and the stage is done
            found += [("continued_pretrain", p) for p in sorted(root.glob("step*")) if p.name != final_tag]
            found += [("continued_pretrain", p) for p in sorted((root / UNIVERSAL_DIR).glob("step*"))]
    return [Removal(stage, path, disk_bytes(path)) for stage, path in found if _own(run_dir, path)]


def clean(run_dir: RunDir, final: bool, dry_run: bool) -> list[Removal]:
    """Remove what `removable` lists (nothing when dry_run); after --final the continued_pretrain
    record says its final checkpoint is gone, so a later export re-run is refused with the reason."""
    removals = removable(run_dir, final)
    if dry_run:
        return removals
    for removal in removals:
        shutil.rmtree(removal.path)
    if final and any(r.stage == "continued_pretrain" for r in removals):
        state = run_dir.state("continued_pretrain")
        state.outputs = {**state.outputs, FINAL_CHECKPOINT_REMOVED: True}
        run_dir.save_state(state)
    return removals

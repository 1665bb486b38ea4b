"""Before tools/setup.sh installs anything: is there room for what it is about to write?

    python3 tools/check_disk.py test|demo      (exit 1 with the shortfall, per disk)

Runs with the system Python, before the venv exists, so it imports the standard library only.
A CI machine with 0.8 GiB free failed in pip on "No space left on device" half-way through torch;
this names the folder, what it needs and how to free it instead. Sizes measured on the demo: the venv
2.0 GiB, the test suite ~2 GiB of temp files at its peak (the 1.7 GB model of test_zero_load), the
demo's run directory ~4.5 GiB (checkpoints kept for resuming).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

GIB = 2**30


def needs(mode: str, repo: Path, temp: Path) -> list[tuple[Path, float, str]]:
    """(folder, GiB, what) for each thing setup.sh writes in `mode`."""
    wanted: list[tuple[Path, float, str]] = []
    if not (repo / ".venv" / "bin" / "python").exists():
        wanted += [(repo, 2.5, "the venv"), (temp, 0.5, "pip's unpacking")]
    if mode == "test":
        return wanted + [(temp, 2.5, "the tests' temp files")]
    return wanted + [(repo, 5.0, "the demo's run directory")]


def shortfalls(mode: str, repo: Path, temp: Path) -> list[str]:
    """One message per disk that lacks the room `needs` adds up to there."""
    by_disk: dict[int, list[tuple[Path, float, str]]] = {}
    for folder, gib, what in needs(mode, repo, temp):
        by_disk.setdefault(os.stat(folder).st_dev, []).append((folder, gib, what))
    messages = []
    for entries in by_disk.values():
        folder = entries[0][0].resolve()
        need, free = sum(gib for _, gib, _ in entries), shutil.disk_usage(folder).free / GIB
        if free < need:
            parts = ", ".join(f"{what} ~{gib:g}" for _, gib, what in entries)
            messages.append(f"not enough disk: {folder} has {free:.1f} GiB free and needs ~{need:g} GiB ({parts}); "
                            f"free space on that disk (old run directories, `pip cache purge`) or set TMPDIR "
                            f"to a folder on a larger disk")
    return messages


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in ("test", "demo"):
        sys.exit("usage: python3 tools/check_disk.py test|demo")
    messages = shortfalls(sys.argv[1], Path(__file__).resolve().parent.parent, Path(tempfile.gettempdir()))
    if messages:
        sys.exit("\n".join(f"[setup] {m}" for m in messages))


if __name__ == "__main__":
    main()

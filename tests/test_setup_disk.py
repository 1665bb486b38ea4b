"""tools/check_disk.py: setup.sh's room check, run before pip writes anything."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from helpers import REPO

GIB = 2**30
spec = importlib.util.spec_from_file_location("check_disk", REPO / "tools" / "check_disk.py")
check_disk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_disk)


def folders(tmp_path: Path, with_venv: bool) -> tuple[Path, Path]:
    repo, temp = tmp_path / "repo", tmp_path / "tmp"
    temp.mkdir()
    (repo / ".venv" / "bin").mkdir(parents=True)
    if with_venv:
        (repo / ".venv" / "bin" / "python").touch()
    return repo, temp


def test_a_fresh_machine_needs_room_for_the_venv_and_the_tests_on_one_disk(tmp_path: Path, disk_of) -> None:
    repo, temp = folders(tmp_path, with_venv=False)
    disk_of(tmp_path, int(0.8 * GIB))
    assert check_disk.shortfalls("test", repo, temp) == [
        f"not enough disk: {repo} has 0.8 GiB free and needs ~5.5 GiB (the venv ~2.5, pip's unpacking ~0.5, "
        f"the tests' temp files ~2.5); free space on that disk (old run directories, `pip cache purge`) or "
        f"set TMPDIR to a folder on a larger disk"]
    disk_of(tmp_path, int(5.5 * GIB))
    assert check_disk.shortfalls("test", repo, temp) == []


def test_an_installed_venv_needs_no_room_again(tmp_path: Path, disk_of) -> None:
    repo, temp = folders(tmp_path, with_venv=True)
    disk_of(tmp_path, 3 * GIB)
    assert check_disk.shortfalls("test", repo, temp) == []
    assert [m.split(";")[0] for m in check_disk.shortfalls("demo", repo, temp)] == [
        f"not enough disk: {repo} has 3.0 GiB free and needs ~5 GiB (the demo's run directory ~5)"]


def test_the_command_exits_non_zero_with_the_message_and_usage() -> None:
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "check_disk.py"), "train"],
                         capture_output=True, text=True)
    assert (bad.returncode, bad.stderr) == (1, "usage: python3 tools/check_disk.py test|demo\n")

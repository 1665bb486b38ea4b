from __future__ import annotations

import collections
import shutil
from pathlib import Path

import pytest

from helpers import run_cli
from maskprune.rundir import branch_run


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of configs/tiny.toml with the prepare stage done: RUN/prepare/model is a small
    trained GQA Llama (4 heads, 2 KV, hidden 64, FFN 192, 4 layers) with its tokenizer."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    run_cli("run", "configs/tiny.toml", "--run-dir", str(run_dir), "--until", "prepare")
    return run_dir


@pytest.fixture(scope="session")
def tiny_tokenized(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_prepared with the tokenize stage done too (Penn Treebank train, 128-token sequences).
    Copy it (`copy_run`) before running later stages in it."""
    run_cli("run", "configs/tiny.toml", "--run-dir", str(tiny_prepared), "--until", "tokenize")
    return tiny_prepared


def copy_run(source: Path, dest: Path) -> Path:
    """A run directory whose finished stages are those of `source` (`rundir.branch_run`): later
    stages read the token shards, which are not copied, in `source` and write into `dest`. The tiny
    models are copied, since the copied checkpoints name theirs relative to themselves."""
    return branch_run(source, dest, skip=("*.bin", "tb")).root


DiskUsage = collections.namedtuple("DiskUsage", "total used free")  # shutil.disk_usage's fields


@pytest.fixture
def disk_of(monkeypatch: pytest.MonkeyPatch):
    """A filesystem of `capacity` bytes holding just `root`: free space falls and rises with what is
    written and removed there (sizes, not blocks: sparse files count in full)."""
    def mount(root: Path, capacity: int) -> None:
        real = shutil.disk_usage

        def usage(path: str | Path):
            if not Path(path).resolve().is_relative_to(root.resolve()):
                return real(path)
            used = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
            return DiskUsage(capacity, used, capacity - used)
        monkeypatch.setattr(shutil, "disk_usage", usage)
    return mount

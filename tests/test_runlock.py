"""One owner per run directory (maskprune/runlock.py): a second holder is refused in one line naming
the first; release frees it; a dead holder's lock is taken over and said so; a stage started by the
holder inherits the lock through its token; the O_EXCL fallback where flock is unsupported."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BIN, REPO, cpu_env
from maskprune import runlock
from maskprune.runlock import LOCK_NAME, OWNER_NAME, TOKEN_ENV, RunLockError, acquire_run_lock

HOLD = ("import sys, time; from pathlib import Path; from maskprune.runlock import acquire_run_lock;"
        "lock = acquire_run_lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")


@pytest.fixture()
def holder(tmp_path: Path):
    """Another process holding tmp_path/run's lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], cwd=REPO, env=cpu_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_second_acquire_is_refused_naming_the_holder(holder: subprocess.Popen, tmp_path: Path) -> None:
    with pytest.raises(RunLockError) as refused:
        acquire_run_lock(tmp_path / "run")
    message = str(refused.value)
    assert "\n" not in message
    assert f"pid {holder.pid} on host {socket.gethostname()} (since " in message
    assert f"kill -USR1 {holder.pid}" in message and "another --run-dir" in message


def test_release_frees_the_lock_without_a_takeover_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lock = acquire_run_lock(tmp_path)
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["token"] == lock.token
    with pytest.raises(RunLockError):
        acquire_run_lock(tmp_path)  # a second open file description of the same process is refused too
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""
    acquire_run_lock(tmp_path).release()
    assert "taking over" not in capsys.readouterr().err


def test_lock_of_a_killed_holder_is_taken_over_and_said(holder: subprocess.Popen, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = acquire_run_lock(tmp_path / "run")
    err = capsys.readouterr().err
    assert f"taking over the lock of pid {holder.pid} on host {socket.gethostname()}" in err
    assert "ended without releasing it" in err
    lock.release()


def test_stage_started_by_the_holder_inherits_it_by_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = acquire_run_lock(tmp_path)
    monkeypatch.setenv(TOKEN_ENV, lock.token)
    child = acquire_run_lock(tmp_path, "stage mask_learn")
    assert not child.owned and child.token == lock.token
    child.release()  # a no-op: the holder releases
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    monkeypatch.setenv(TOKEN_ENV, "0" * 32)  # a token of another (earlier) holder is not enough
    with pytest.raises(RunLockError):
        acquire_run_lock(tmp_path, "stage mask_learn")
    lock.release()


def test_without_flock_an_exclusive_file_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    lock = acquire_run_lock(tmp_path)
    assert "does not support flock" in capsys.readouterr().err
    with pytest.raises(RunLockError, match=f"pid {os.getpid()} on host"):
        acquire_run_lock(tmp_path)
    lock.release()
    assert not (tmp_path / OWNER_NAME).exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = tmp_path / OWNER_NAME
    owner.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": 0,
                                 "start_ticks": 1, "token": "x"}))
    acquire_run_lock(tmp_path).release()
    assert f"taking over the lock of pid {int(dead.stdout)}" in capsys.readouterr().err

    owner.write_text(json.dumps({"host": "elsewhere-node07", "pid": 4242, "since": 0, "token": "x"}))
    with pytest.raises(RunLockError, match=f"on host elsewhere-node07.*delete {owner}"):
        acquire_run_lock(tmp_path)


def test_maskprune_run_is_refused_while_locked(holder: subprocess.Popen, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    before = sorted(p.name for p in run_dir.iterdir())
    proc = subprocess.run([str(BIN / "maskprune"), "run", "configs/tiny.toml", "--run-dir", str(run_dir),
                           "--until", "prepare"], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskprune: error: ")
    assert f"in use by maskprune run, pid {holder.pid} on host {socket.gethostname()}" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written: no config.toml


def test_distributed_stage_takes_the_token_from_its_command_line(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """deepspeed over pdsh passes only some variables to other nodes: `--run-lock` carries it there."""
    from maskprune.dist import stage_argv_parser

    lock = acquire_run_lock(tmp_path)
    monkeypatch.setenv(TOKEN_ENV, "")  # not passed on by the launcher (and restored after the test)
    stage_argv_parser("stage").parse_args(["--run-dir", str(tmp_path), *lock.child_args()])
    assert not acquire_run_lock(tmp_path, "stage mask_learn").owned
    lock.release()

"""The progress watchdog (maskprune.watchdog), run in subprocesses: faulthandler's timer is
process-wide and pytest's own faulthandler_timeout must keep it. Also the two decisions the
distributed start makes on CPU-checkable inputs: the fp32-on-GPU warning and rank 0's resume tag."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO, cpu_env
from maskprune.config import ConfigError, load_config
from maskprune.training import COMPLETE_MARKER, Checkpointer, load_ds_config, precision_warning


def run_python(code: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


def test_petted_more_often_than_the_timeout_it_survives_past_it() -> None:
    # Timeout 3 s, a pet every 0.2 s for 6 s: 15x margin against a late wake-up on a loaded machine.
    proc, _ = run_python("""
        import time
        from maskprune.watchdog import WATCHDOG
        WATCHDOG.arm(3.0)
        end = time.monotonic() + 6.0
        while time.monotonic() < end:
            time.sleep(0.2)
            WATCHDOG.pet("tick")
        with WATCHDOG.guard("a long operation"):
            time.sleep(0.5)
        WATCHDOG.disarm()
        time.sleep(4.0)  # disarmed: no deadline any more
        print("survived")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "survived" and "maskprune: watchdog" not in proc.stderr


def test_without_progress_it_dumps_every_stack_and_exits_non_zero() -> None:
    proc, seconds = run_python("""
        import threading, time
        from maskprune.watchdog import WATCHDOG

        def stuck_in_a_collective():
            time.sleep(100)

        threading.Thread(target=time.sleep, args=(100,), name="helper", daemon=True).start()
        WATCHDOG.arm(1.0, "step 7")
        stuck_in_a_collective()
        print("not reached")
    """)
    assert proc.returncode == 70, (proc.returncode, proc.stderr[-3000:])
    assert seconds < 60  # fired at ~1 s; the sleep would take 100
    assert "not reached" not in proc.stdout
    err = proc.stderr
    assert ("maskprune: watchdog: rank 0 made no progress for 1 s (launcher.hang_timeout_minutes = "
            "0.0166667; last progress: step 7)") in err, err
    assert err.count("Thread 0x") >= 2  # the main thread and the helper, not only the current one
    assert "in stuck_in_a_collective" in err and 'File "<string>"' in err


def test_a_conversion_that_keeps_writing_outlives_the_timeout_and_one_that_stops_does_not(tmp_path: Path) -> None:
    """Rank 0's in-job universal conversion (maskprune.universal.reporting_progress): timeout 3 s, I/O
    looked at every 0.2 s. Writing for 8 s survives and bumps the heartbeat; then a minute without a
    byte read or written ends the process as a hang, naming the conversion and how far it got."""
    proc, seconds = run_python(f"""
        import time
        from pathlib import Path
        from maskprune.universal import reporting_progress
        from maskprune.watchdog import WATCHDOG
        heartbeat, data = Path({str(tmp_path / "heartbeat")!r}), Path({str(tmp_path / "data")!r})
        WATCHDOG.arm(3.0, "resume")
        with reporting_progress(heartbeat, "universal conversion of step40", interval_s=0.2):
            end = time.monotonic() + 8.0
            with data.open("wb") as out:
                while time.monotonic() < end:
                    out.write(bytes(1 << 16)); out.flush()
                    time.sleep(0.05)
        print("survived", int(heartbeat.read_text()) >= 10, flush=True)
        with reporting_progress(heartbeat, "universal conversion of step40", interval_s=0.2):
            time.sleep(60)
        print("not reached")
    """)
    assert proc.returncode == 70, (proc.returncode, proc.stderr[-3000:])
    assert "survived True" in proc.stdout and "not reached" not in proc.stdout
    assert seconds < 45  # 8 s of writing, then fired at ~3 s: not after the minute's sleep
    assert "last progress: universal conversion of step40: " in proc.stderr and "MiB read and written" in proc.stderr


def test_waiting_ranks_follow_rank_0s_heartbeat_until_the_folder_is_complete(tmp_path: Path) -> None:
    """A waiting rank (maskprune.universal.wait_following), timeout 3 s: a heartbeat bumped every
    0.5 s for 8 s keeps it alive, and it returns once the marker appears; without a heartbeat it fires."""
    proc, _ = run_python(f"""
        import threading, time
        from pathlib import Path
        from maskprune.universal import wait_following
        from maskprune.watchdog import WATCHDOG
        heartbeat, done = Path({str(tmp_path / "heartbeat")!r}), Path({str(tmp_path / "COMPLETE")!r})

        def rank0():
            for beat in range(16):
                heartbeat.write_text(str(beat)); time.sleep(0.5)
            done.write_text("step40")
        threading.Thread(target=rank0, daemon=True).start()
        WATCHDOG.arm(3.0, "resume")
        started = time.monotonic()
        wait_following(done, heartbeat, "rank 0's conversion", interval_s=0.1)
        print(f"returned after {{time.monotonic() - started:.1f}} s", flush=True)
        wait_following(Path({str(tmp_path / "never")!r}), heartbeat, "rank 0's conversion", interval_s=0.1)
        print("not reached")
    """)
    assert proc.returncode == 70, (proc.returncode, proc.stderr[-3000:])
    returned = [line for line in proc.stdout.splitlines() if line.startswith("returned after")]
    assert len(returned) == 1 and 7.9 <= float(returned[0].split()[2]) < 20, proc.stdout
    assert "not reached" not in proc.stdout
    assert "last progress: waiting for rank 0's conversion" in proc.stderr


def test_rearmed_after_disarm_it_fires_again() -> None:
    proc, _ = run_python("""
        import time
        from maskprune.watchdog import WATCHDOG
        WATCHDOG.arm(1.0)
        WATCHDOG.disarm()
        time.sleep(2.5)
        WATCHDOG.arm(1.0, "second arm")
        time.sleep(100)
    """)
    assert proc.returncode == 70 and "last progress: second arm" in proc.stderr, proc.stderr[-3000:]


def test_pet_before_arm_is_a_no_op_in_this_process() -> None:
    from maskprune.watchdog import WATCHDOG

    assert not WATCHDOG.armed  # nothing in the test process arms it (pytest owns faulthandler's timer)
    WATCHDOG.pet("nothing")
    with WATCHDOG.guard("nothing"):
        pass
    assert not WATCHDOG.armed


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_hang_timeout_must_be_positive_and_finite(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "tiny.toml", [f"launcher.hang_timeout_minutes={value}"])
    message = str(err.value)
    assert message.startswith("launcher.hang_timeout_minutes: must be a number of minutes > 0, got ")
    assert "\n" not in message


def test_hang_timeout_defaults_to_30_minutes_and_is_overridable() -> None:
    assert load_config(REPO / "configs" / "tiny.toml").launcher.hang_timeout_minutes == 30
    cfg = load_config(REPO / "configs" / "tiny.toml", ["launcher.hang_timeout_minutes=1"])
    assert cfg.launcher.hang_timeout_minutes == 1.0


def test_collective_timeout_follows_the_hang_timeout() -> None:
    import datetime

    from maskprune.dist import collective_timeout

    assert collective_timeout(30) == datetime.timedelta(minutes=31)
    assert collective_timeout(0.5) == datetime.timedelta(seconds=90)


@pytest.mark.parametrize("ds_config, gpu, warned", [
    ("ds_configs/zero3_cpu_fp32.json", True, True),
    ("ds_configs/zero3_cpu_fp32.json", False, False),
    ("ds_configs/zero3_gpu_bf16.json", True, False),
    ("ds_configs/zero3_gpu_bf16_offload.json", True, False),
])
def test_fp32_cpu_ds_config_on_gpu_is_warned(ds_config: str, gpu: bool, warned: bool) -> None:
    cfg = load_config(REPO / "configs" / "tiny.toml")
    ds = load_ds_config(REPO / ds_config, cfg.mask_learn.train)
    warning = precision_warning("mask_learn", ds, gpu)
    if warned:
        assert warning == ("mask_learn: warning: CUDA is present but the ds_config trains in fp32 (neither "
                           "bf16 nor fp16 enabled; the CPU default); on GPUs set "
                           'mask_learn.ds_config = "ds_configs/zero3_gpu_bf16.json"')
        assert (REPO / "ds_configs" / "zero3_gpu_bf16.json").is_file()  # the file it names exists
    else:
        assert warning is None


class RecordingCheckpointer(Checkpointer):
    """Records which tag resume asks to load instead of loading a DeepSpeed engine."""

    loaded: str | None = None

    def load(self, engine: Any, tag: str) -> tuple[dict[str, Any], dict]:
        self.loaded = tag
        return {"step": int(tag.removeprefix("step")), "data": {}}, {}


class NoData:
    def load_state_dict(self, state: dict) -> None:
        pass


def make_tags(root: Path, complete: list[int], incomplete: list[int]) -> None:
    for step in complete + incomplete:
        (root / f"step{step:08d}").mkdir(parents=True)
    for step in complete:
        (root / f"step{step:08d}" / COMPLETE_MARKER).write_text(f"{step}\n")


def test_resume_outside_a_job_takes_the_newest_complete_tag(tmp_path: Path) -> None:
    make_tags(tmp_path, complete=[3, 6], incomplete=[9])
    ckpt = RecordingCheckpointer(tmp_path, keep_last=2)
    assert ckpt.resume(None, NoData(), "auto", "mask_learn") == (6, {})
    assert ckpt.loaded == "step00000006"
    assert RecordingCheckpointer(tmp_path, keep_last=2).resume(None, NoData(), "never", "mask_learn") is None


def test_resume_on_rank_1_loads_the_tag_rank_0_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rank 1's listing already shows step 9 complete (a save under way on a shared filesystem) while
    # rank 0 chose step 6: rank 1 must load step 6, and must not offer a choice of its own.
    import maskprune.training as training

    make_tags(tmp_path, complete=[3, 6, 9], incomplete=[])
    offered: list[object] = []

    def rank0_says(value: object) -> str:
        offered.append(value)
        return "step00000006"

    monkeypatch.setattr(training, "rank", lambda: 1)
    monkeypatch.setattr(training, "broadcast_from_rank0", rank0_says)
    ckpt = RecordingCheckpointer(tmp_path, keep_last=3)
    assert ckpt.resume(None, NoData(), "auto", "mask_learn") == (6, {})
    assert ckpt.loaded == "step00000006" and offered == [None]

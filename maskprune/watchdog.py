"""Progress watchdog: a rank that makes no progress for `launcher.hang_timeout_minutes` prints why,
dumps every thread's stack and exits non-zero, so a hung collective or a stopped peer fails the job
loudly instead of eating its time limit. A job that keeps making progress runs as long as it needs.

    WATCHDOG.arm(30 * 60)               # init_distributed
    WATCHDOG.pet("step 12")             # every step boundary
    with WATCHDOG.guard("checkpoint save"):   # a long single operation: petted before and after
        ...
    WATCHDOG.disarm()                   # the stage is over

Loops that make progress inside a long operation (a shard written, a tensor read) call `pet()`; it
costs a clock read and is a no-op while the watchdog is not armed (single-process stages, tests).
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

HANG_EXIT_CODE = 70  # EX_SOFTWARE: the rank ended itself because nothing progressed

# The watchdog's thread needs the GIL to speak; a hang inside C code that holds it is caught by
# faulthandler's GIL-free timer this much later (stacks, exit 1, no message).
BACKSTOP_S = 30.0


class Watchdog:
    def __init__(self) -> None:
        self.timeout_s: float | None = None
        self._last = 0.0
        self._what = ""
        self._backstop_at = 0.0  # when faulthandler's timer was last re-armed
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def armed(self) -> bool:
        return self.timeout_s is not None

    def arm(self, timeout_s: float, what: str = "start") -> None:
        if timeout_s <= 0:
            raise ValueError(f"watchdog timeout must be > 0 s, got {timeout_s}")
        self.timeout_s = timeout_s
        self._backstop_at = 0.0
        self.pet(what)
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="maskprune-watchdog", daemon=True)
            self._thread.start()
        self._wake.set()

    def pet(self, what: str = "") -> None:
        """Progress was made (`what`: the last thing done, named in the message if nothing follows)."""
        if self.timeout_s is None:
            return
        self._last = time.monotonic()
        if what:
            self._what = what
        # Re-arming faulthandler's timer costs a C thread hand-off: at most once a second.
        if self._last - self._backstop_at > 1.0:
            self._backstop_at = self._last
            faulthandler.dump_traceback_later(self.timeout_s + BACKSTOP_S, exit=True)

    def disarm(self) -> None:
        if self.timeout_s is None:
            return
        self.timeout_s = None
        faulthandler.cancel_dump_traceback_later()
        self._wake.set()

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """A long single operation: the watchdog is petted as it starts and when it ends."""
        self.pet(f"{what} (started)")
        yield
        self.pet(f"{what} (finished)")

    def _watch(self) -> None:
        # Woken early by arm/disarm; otherwise sleeps until the deadline of the latest pet it saw.
        while True:
            timeout = self.timeout_s
            if timeout is None:
                remaining = None
            else:
                remaining = self._last + timeout - time.monotonic()
                if remaining <= 0:
                    self._fire(timeout)
            self._wake.wait(remaining)
            self._wake.clear()

    def _fire(self, timeout: float) -> None:
        rank = os.environ.get("RANK", "0")
        print(f"maskprune: watchdog: rank {rank} made no progress for {timeout:.0f} s "
              f"(launcher.hang_timeout_minutes = {timeout / 60:g}; last progress: {self._what}): a hung "
              f"collective or a stopped or dead rank? Every thread's stack follows; exiting with code "
              f"{HANG_EXIT_CODE}. If a single step, checkpoint or load legitimately takes this long, "
              "raise launcher.hang_timeout_minutes.", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(HANG_EXIT_CODE)


WATCHDOG = Watchdog()  # one per process: faulthandler's timer is process-wide

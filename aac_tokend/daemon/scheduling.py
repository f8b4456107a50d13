"""The clock and the scheduler, behind small interfaces the tests replace with fakes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

__all__ = ["APScheduler", "Clock", "Scheduler", "SystemClock"]

#: The longest the scheduler ever sleeps. Its waits run on CLOCK_MONOTONIC, which on Linux
#: does not advance while the machine is suspended: a job due during a suspend would fire
#: only after the remaining monotonic wait. Waking at least this often bounds how late a
#: refresh runs after a resume or a wall-clock jump, well inside the 5 s promise.
WAKE_CAP_SECONDS = 2.0
#: Refreshes run in couriers and only wait here; a few workers keep 1,000 profiles on time.
WORKERS = 8


class Clock(Protocol):
    """Wall-clock time in Unix seconds, and a monotonic clock for measuring how long since.

    Wall time is what token expiries (``exp``, ``expires_in`` counted from receipt) and the
    state file speak, so the policy runs on it. But the wall clock can step (NTP, a person,
    a VM restored from a snapshot); the monotonic clock cannot, so the engine also measures
    a token's age on it and trusts whichever clock says the token is older.
    """

    def now(self) -> float: ...
    def monotonic(self) -> float: ...


#: CLOCK_BOOTTIME keeps counting while the machine is suspended, as a token's lifetime at the
#: server does; CLOCK_MONOTONIC (all macOS offers) stops, and then the wall clock, which does
#: count the suspend, is the one that ends serving first.
_MONOTONIC_ID = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


class SystemClock:
    """The real wall clock, and the boot-time clock (monotonic, counting suspend) where known."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.clock_gettime(_MONOTONIC_ID)


class Scheduler(Protocol):
    """Runs callables at wall-clock times, one pending run per key."""

    def schedule(self, key: str, at: float, fn: Callable[[], object]) -> None: ...
    def cancel(self, key: str) -> None: ...
    def every(self, key: str, seconds: float, fn: Callable[[], object]) -> None: ...
    def start(self) -> None: ...
    def shutdown(self) -> None: ...


class APScheduler:
    """APScheduler 3's BackgroundScheduler: date jobs per profile, a monotonic-paced tick."""

    def __init__(self) -> None:
        self._stopped = threading.Event()
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self._scheduler: Any = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(WORKERS)},
            job_defaults={
                "coalesce": True,
                # Never drop a late run (after a suspend it is the one that matters).
                "misfire_grace_time": None,
                # A profile's next job may come due while its previous run is returning;
                # the engine's own per-profile guard keeps refreshes from overlapping.
                "max_instances": 4,
            },
        )

    def schedule(self, key: str, at: float, fn: Callable[[], object]) -> None:
        try:
            when = datetime.fromtimestamp(at, UTC)
        except (OverflowError, OSError, ValueError):
            # A time no date can hold (a stored expiry near year 9999 plus a backoff): no
            # date job; the tick still runs the refresh if it ever comes due.
            self.cancel(key)
            return
        self._scheduler.add_job(fn, "date", run_date=when, id=key, replace_existing=True)

    def cancel(self, key: str) -> None:
        from apscheduler.jobstores.base import JobLookupError

        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(key)

    def every(self, key: str, seconds: float, fn: Callable[[], object]) -> None:
        """Run ``fn`` every ``seconds`` of monotonic time, through the scheduler's workers.

        Not APScheduler's interval trigger: that counts in wall time, and its loop sleeps
        until the next run with no cap, so after the wall clock steps back an hour it would
        sleep an hour, tick and catch-up included. A pacer thread on the monotonic clock
        submits each run instead, and its submission also wakes the scheduler's loop, so
        date jobs that a forward step made due run at once. Runs still go through the
        scheduler, so a hung scheduler still stops the tick (the daemon's watchdog sees it).
        """

        def pace() -> None:
            while not self._stopped.wait(seconds):
                # No trigger: a date job at the scheduler's own "now", so it runs at once.
                self._scheduler.add_job(fn, id=key, replace_existing=True)

        threading.Thread(target=pace, name=f"pace-{key}", daemon=True).start()

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        self._stopped.set()
        self._scheduler.shutdown(wait=False)

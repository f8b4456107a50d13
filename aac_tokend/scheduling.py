"""The clock and the scheduler, behind small interfaces the tests replace with fakes."""

from __future__ import annotations

import contextlib
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
    """Wall-clock time in Unix seconds."""

    def now(self) -> float: ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> float:
        return time.time()


class Scheduler(Protocol):
    """Runs callables at wall-clock times, one pending run per key."""

    def schedule(self, key: str, at: float, fn: Callable[[], object]) -> None: ...
    def cancel(self, key: str) -> None: ...
    def every(self, key: str, seconds: float, fn: Callable[[], object]) -> None: ...
    def start(self) -> None: ...
    def shutdown(self) -> None: ...


class APScheduler:
    """APScheduler 3's BackgroundScheduler: date jobs per profile, one interval tick."""

    def __init__(self) -> None:
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
        when = datetime.fromtimestamp(at, UTC)
        self._scheduler.add_job(fn, "date", run_date=when, id=key, replace_existing=True)

    def cancel(self, key: str) -> None:
        from apscheduler.jobstores.base import JobLookupError

        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(key)

    def every(self, key: str, seconds: float, fn: Callable[[], object]) -> None:
        self._scheduler.add_job(fn, "interval", seconds=seconds, id=key, replace_existing=True)

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        self._scheduler.shutdown(wait=False)

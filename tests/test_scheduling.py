"""The real scheduler edge: its tick is paced on the monotonic clock, and odd times never raise."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from aac_tokend.daemon.scheduling import APScheduler, SystemClock


@pytest.fixture
def scheduler() -> Iterator[APScheduler]:
    sched = APScheduler()
    sched.start()
    yield sched
    sched.shutdown()


class TestPacedTick:
    """``every`` runs its function at its cadence until shutdown."""

    def test_ticks_at_the_cadence_then_stops(self) -> None:
        """About ten runs a second at 0.1 s; none once shut down."""
        sched = APScheduler()
        runs: list[float] = []
        sched.every("tick", 0.1, lambda: runs.append(time.monotonic()))
        sched.start()
        time.sleep(1.05)
        sched.shutdown()
        assert 5 <= len(runs) <= 12
        settled = len(runs)
        time.sleep(0.3)
        assert len(runs) <= settled + 1  # at most one run already submitted

    def test_runs_go_through_the_scheduler_workers(self, scheduler: APScheduler) -> None:
        """The tick runs on the scheduler's worker threads, so a hung scheduler stops it."""
        names: list[str] = []
        done = threading.Event()

        def record() -> None:
            names.append(threading.current_thread().name)
            done.set()

        scheduler.every("tick", 0.05, record)
        assert done.wait(5)
        assert not names[0].startswith("pace-")


class TestOddTimes:
    """A time no date can hold is not scheduled, and never raises."""

    @pytest.mark.parametrize("at", [1e300, -1e300, float("inf"), float("nan"), 253_402_400_000.0])
    def test_schedule_out_of_range_does_not_raise(self, scheduler: APScheduler, at: float) -> None:
        """No exception; the tick covers the refresh if it ever comes due."""
        scheduler.schedule("work", at, lambda: None)
        scheduler.cancel("work")


class TestSystemClock:
    """The monotonic clock of the real clock counts on and never steps."""

    def test_monotonic_advances(self) -> None:
        """Two reads 50 ms apart differ by about 50 ms."""
        clock = SystemClock()
        first = clock.monotonic()
        time.sleep(0.05)
        assert 0.04 <= clock.monotonic() - first <= 1.0

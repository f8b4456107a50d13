"""The clock that D is counted on: one that keeps counting while the host is suspended.

Issue #13 item 4: a laptop that was suspended, or a host that was paused, between its
journal commit and its request must wake past D and send nothing. ``time.monotonic()``
(CLOCK_MONOTONIC on Linux) stops during a suspend, so a courier suspended for an hour would
wake believing a millisecond had passed. On Linux ``CLOCK_BOOTTIME`` counts the suspended
time too. On macOS ``CLOCK_MONOTONIC`` (mach_continuous_time underneath) already counts
sleep, unlike Linux's; ``CLOCK_BOOTTIME`` does not exist there. A paused process (SIGSTOP,
a VM frozen) is seen by either clock, which keeps counting while the process does not run.

Every user takes it as an argument (``boottime: Callable[[], float]``), so that a test can
jump it past D: a real suspend cannot be run in a test.
"""

from __future__ import annotations

import sys
import time

__all__ = ["suspend_clock"]

_CLOCK = (
    time.CLOCK_BOOTTIME  # type: ignore[attr-defined,unused-ignore]
    if sys.platform.startswith("linux")
    else time.CLOCK_MONOTONIC
)


def suspend_clock() -> float:
    """Seconds since an arbitrary point, counting the time the host spent suspended."""
    return time.clock_gettime(_CLOCK)

"""Benchmark of the idle daemon's footprint: resident memory and CPU over an idle window.

The baseline is a bare interpreter that imports the libraries the daemon loads (requests,
cryptography's AESGCM, APScheduler's BackgroundScheduler, structlog) and sleeps, measured
over the same window. The window can overlap other work of the benchmark (a courier
benchmark, building the regular install): neither touches the daemon, and CPU time is what
the daemon itself spends, not what it is given.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.bench_procs import PY, Daemon, Row, cpu_seconds, memory_kib, row

__all__ = ["BASELINE_IMPORTS", "IdleWindow", "footprint_rows"]

#: Targets from the brief: under 45 MB resident, under 50 ms CPU per idle minute.
RSS_TARGET_MB = 45.0
CPU_TARGET_MS_PER_MIN = 50.0
BASELINE_IMPORTS = (
    "import requests, structlog; "
    "import cryptography.hazmat.primitives.ciphers.aead; "
    "import apscheduler.schedulers.background"
)


class IdleWindow:
    """Reads two processes' CPU at the start and after ``seconds``, from a timer thread."""

    def __init__(self, pids: dict[str, int], seconds: float) -> None:
        self._pids, self.seconds = pids, seconds
        self.start = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.end: dict[str, float] = {}
        self.rss: dict[str, int] = {}
        self.done = threading.Event()
        self._timer = threading.Timer(seconds, self._finish)
        self._timer.daemon = True
        self._timer.start()

    def _finish(self) -> None:
        self.end = {name: cpu_seconds(pid) for name, pid in self._pids.items()}
        self.rss = {name: memory_kib(pid) for name, pid in self._pids.items()}
        self.done.set()

    def cpu_ms_per_minute(self, name: str) -> float:
        self.done.wait()
        return (self.end[name] - self.start[name]) * 1000 * 60 / self.seconds


def _bare_process() -> subprocess.Popen[str]:
    code = f"{BASELINE_IMPORTS}; import sys, time; print('ready', flush=True); time.sleep(3600)"
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("the footprint baseline process did not start")
    return proc


def footprint_rows(
    daemon: Daemon, seconds: float, meanwhile: Callable[[], Any] = lambda: None
) -> tuple[list[Row], Any]:
    """Idle footprint of ``daemon`` (one profile); runs ``meanwhile()`` inside the window."""
    bare = _bare_process()
    try:
        time.sleep(1.0)  # both settle: the daemon's first scheduler ticks, the bare imports
        window = IdleWindow({"daemon": daemon.pid, "bare": bare.pid}, seconds)
        result = meanwhile()
        window.done.wait()
        cpu = window.cpu_ms_per_minute("daemon")
        bare_cpu = window.cpu_ms_per_minute("bare")
    finally:
        bare.kill()
        bare.wait()
    rss, bare_rss = window.rss["daemon"] / 1024, window.rss["bare"] / 1024
    rows = [
        row("idle daemon resident memory (1 profile)", rss, "MB", bare_rss,
            "bare python importing the same libraries", target=f"< {RSS_TARGET_MB:.0f} MB",
            met=rss < RSS_TARGET_MB),
        row(f"idle daemon CPU per minute (over {seconds:.0f} s)", cpu, "ms/min", bare_cpu,
            "the same bare python, same window", target=f"< {CPU_TARGET_MS_PER_MIN:.0f} ms/min",
            met=cpu < CPU_TARGET_MS_PER_MIN, ratio=cpu / bare_cpu if bare_cpu else None),
    ]  # fmt: skip
    return rows, result

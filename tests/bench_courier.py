"""Benchmark of one refresh carried by a courier, against the same refresh in process.

The courier API is used directly: a FileStore in a temp dir holds one profile imported from
the sandbox, and each round refreshes it once through each refresher in turn (interleaved,
so a noisy moment hits all alike). The baseline, InProcessRefresher, runs the very same
transaction (lock, journal save, POST, durable outcome) in the calling thread.

Spawn is forced here whatever the platform (Linux forks by default): the cold row is a
courier started per refresh (what a second concurrent refresh gets), the warm row hands the
job to a spare started in advance (the default spawn path, spawn.py). After each warm
refresh its replacement spare is waited for (a daemon's spare has minutes to get ready), so
its imports neither count nor slow the rows beside it. The budget is judged on the warm row;
the cold row is there to show what the spare saves.
"""

from __future__ import annotations

import secrets
import shutil
import statistics
import time
from collections.abc import Callable

from aac_tokend.core.importer import build_state
from aac_tokend.refresh.courier import ForkCourier, InProcessRefresher, Refresher
from aac_tokend.refresh.result import CourierKind
from aac_tokend.refresh.spawn import SpawnCourier
from aac_tokend.refresh.transaction import CourierJob
from aac_tokend.store.files import FileStore, FileStoreSpec
from tests.bench_procs import Row, Sandbox, import_request, memory_kib, row, short_dir

__all__ = ["courier_rows"]

#: The brief's budget for a courier: at most 1.5x the in-process refresh, or 100 ms more.
RATIO_TARGET = 1.5
EXTRA_TARGET_MS = 100.0
#: A cold spawn pays a fresh interpreter's imports (~0.3-0.5 s): fewer rounds of it.
COLD_EVERY = 4
#: A warm one costs a replacement spare's imports after it (off the clock): every other round.
WARM_EVERY = 2
#: A spare not ready after this long means the machine is far too busy to measure anything.
READY_TIMEOUT = 30.0


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def _p95(values: list[float]) -> float:
    return _percentile(values, 0.95)


def _refresh_once(refresher: Refresher, store: FileStore) -> float:
    state = store.load("bench")
    assert state is not None and state.refresh_token is not None
    job = CourierJob("bench", state.refresh_token)
    start = time.perf_counter()
    result = refresher.refresh(job)
    elapsed = time.perf_counter() - start
    if result.kind is not CourierKind.REFRESHED:
        raise SystemExit(f"courier benchmark: a refresh ended {result.kind}: {result.detail}")
    return elapsed * 1000


def _spare_ready(warm: SpawnCourier) -> int:
    pid = warm.prepare(READY_TIMEOUT)
    if pid is None:
        raise SystemExit("courier benchmark: the spawn courier's spare did not get ready")
    return pid


def courier_rows(sandbox: Sandbox, rounds: int) -> list[Row]:
    """Median and p95 refresh latency of each courier vs in-process; the spare's memory."""
    directory = short_dir()
    key = secrets.token_bytes(32)
    spec = FileStoreSpec(str(directory), key)
    warm = SpawnCourier(spec)
    cold = SpawnCourier(spec, warm=False)
    try:
        store = FileStore(directory, key)
        store.save(build_state(import_request(sandbox, "bench", sandbox.generate()), time.time()))
        refreshers: dict[str, tuple[Refresher, int]] = {
            "in-process": (InProcessRefresher(spec.open()), 1),
            "fork": (ForkCourier(spec), 1),
            "cold spawn": (cold, COLD_EVERY),
            "warm spawn": (warm, WARM_EVERY),
        }
        times: dict[str, list[float]] = {name: [] for name in refreshers}
        for refresher, _ in refreshers.values():  # warm-up: connections, imports, caches
            _refresh_once(refresher, store)
        spare = _spare_ready(warm)
        for i in range(rounds):
            for name, (refresher, every) in refreshers.items():
                if i % every == 0:
                    times[name].append(_refresh_once(refresher, store))
                    if refresher is warm:  # its replacement's imports: off every row's clock
                        spare = _spare_ready(warm)
        spare_mb = memory_kib(spare) / 1024
    finally:
        warm.close()
        cold.close()
        shutil.rmtree(directory)
    rows = _latency_rows(times, "fork", "fork courier", judged=True)
    rows += _latency_rows(times, "cold spawn", "spawn courier, cold (no spare)", judged=False)
    rows += _latency_rows(times, "warm spawn", "spawn courier, warm spare (default)", judged=True)
    rows.append(row("spawn courier's waiting spare, resident memory", spare_mb, "MB", None,
                    "-"))  # fmt: skip
    return rows


def _latency_rows(times: dict[str, list[float]], key: str, what: str, *, judged: bool) -> list[Row]:
    base = times["in-process"]
    rows: list[Row] = []
    pickers: tuple[tuple[str, Callable[[list[float]], float]], ...] = (
        ("median", statistics.median),
        ("p95", _p95),
    )
    for label, pick in pickers:
        got, ref = pick(times[key]), pick(base)
        met = got <= ref * RATIO_TARGET or got - ref <= EXTRA_TARGET_MS
        rows.append(
            row(f"refresh via {what}, {label} ({len(times[key])} runs): {got - ref:+.0f} ms",
                got, "ms", ref, f"in-process refresh {label} ({len(base)} runs)",
                target=f"<= {RATIO_TARGET}x or +{EXTRA_TARGET_MS:.0f} ms" if judged else "",
                met=met if judged else None)
        )  # fmt: skip
    return rows

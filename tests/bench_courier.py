"""Benchmark of one refresh carried by a courier, against the same refresh in process.

The courier API is used directly: a FileStore in a temp dir holds one profile imported from
the sandbox, and each round refreshes it once through each refresher in turn (interleaved,
so a noisy moment hits all alike). The baseline, InProcessRefresher, runs the very same
transaction (lock, journal save, POST, durable outcome) in the calling thread.
"""

from __future__ import annotations

import secrets
import shutil
import statistics
import time

from aac_tokend.core.importer import build_state
from aac_tokend.refresh.courier import (
    CourierJob,
    ForkCourier,
    InProcessRefresher,
    Refresher,
    SpawnCourier,
)
from aac_tokend.refresh.result import CourierKind
from aac_tokend.store.files import FileStore, FileStoreSpec
from tests.bench_procs import Row, Sandbox, import_request, row, short_dir

__all__ = ["courier_rows"]

#: The brief's budget for a courier: at most 1.5x the in-process refresh, or 100 ms more.
RATIO_TARGET = 1.5
EXTRA_TARGET_MS = 100.0
#: A spawned courier pays a fresh interpreter's imports (~0.2 s): fewer rounds of it.
SPAWN_EVERY = 4


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


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


def courier_rows(sandbox: Sandbox, rounds: int) -> list[Row]:
    """Median and p95 refresh latency of ForkCourier and SpawnCourier vs in-process."""
    directory = short_dir()
    try:
        key = secrets.token_bytes(32)
        store = FileStore(directory, key)
        store.save(build_state(import_request(sandbox, "bench", sandbox.generate()), time.time()))
        spec = FileStoreSpec(str(directory), key)
        refreshers: dict[str, Refresher] = {
            "in-process": InProcessRefresher(spec.open()),
            "fork": ForkCourier(spec),
            "spawn": SpawnCourier(spec),
        }
        times: dict[str, list[float]] = {name: [] for name in refreshers}
        for refresher in refreshers.values():  # warm-up: connections, imports, caches
            _refresh_once(refresher, store)
        for i in range(rounds):
            for name, refresher in refreshers.items():
                if name != "spawn" or i % SPAWN_EVERY == 0:
                    times[name].append(_refresh_once(refresher, store))
    finally:
        shutil.rmtree(directory)
    base = times["in-process"]
    rows: list[Row] = []
    for name in ("fork", "spawn"):
        for label, pick in (("median", statistics.median), ("p95", _p95)):
            got, ref = pick(times[name]), pick(base)
            met = got <= ref * RATIO_TARGET or got - ref <= EXTRA_TARGET_MS
            rows.append(
                row(f"refresh via {name} courier, {label} ({len(times[name])} runs)", got,
                    "ms", ref, f"in-process refresh {label} ({len(base)} runs)",
                    target=f"<= {RATIO_TARGET}x or +{EXTRA_TARGET_MS:.0f} ms", met=met)
            )  # fmt: skip
    return rows


def _p95(values: list[float]) -> float:
    return _percentile(values, 0.95)

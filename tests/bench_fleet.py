"""Benchmark of fleet mode (issue #13): failover, propagation, follower reads, etcd traffic.

Three daemons as three hosts on a 3-member loopback etcd run with etcd's defaults
(tests/bench_fleet_rig.py), beside the single-host daemon and sandbox of ``python -m
tests.bench``. Each figure has its baseline measured in the same run:

- etcd requests per refresh: every HTTP request the owner host (daemon and couriers) sends
  through its proxy during forced refreshes, by path, less the same paths' idle rate over an
  equal time; keepalives and watch (re)opens are background and shown only per idle second.
  Seen per refresh: the courier's read (kv/range), journal commit (kv/txn), lease check
  (lease/timetolive) and outcome commit (kv/txn), then the daemon's read of what it committed
  (kv/range): the design's 5.
- commit to follower: from the owner's outcome commit (its answer passing the proxy) to the
  follower's socket serving the new token (a forked poller reads it every ~0.3 ms), against
  a plain etcd put's round trip;
- the fleet refresh: a forced refresh (control socket) on the owner, with its spare courier
  ready as a daemon's spare is between refreshes, taken turn about with one on the
  single-host daemon (its fork courier); the budget is bench_courier's;
- follower reads: bench_reads' read loop on a follower and on the single-host daemon;
- failover: the owner SIGKILLed (idle: no attempt in flight, so no wait W), until a
  follower's status says it owns the chain, and until a forced refresh there rotated the
  token, against the TTL etcd granted the lease: the lease ends at most one TTL after the
  kill, and a keepalive period more covers etcd's expiry sweep and the follower's campaign;
- the hosts' stop after SIGTERM, against the daemon's promise of 2 s.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from functools import partial

from aac_tokend.client import ControlClient, read_token
from aac_tokend.fleet.etcd import EtcdClient
from aac_tokend.fleet.keys import FleetKeys
from aac_tokend.fleet.settings import FleetSettings
from aac_tokend.sandbox.demo_fleet import FLEET_TIMINGS
from tests.bench_courier import EXTRA_TARGET_MS, RATIO_TARGET
from tests.bench_fleet_rig import (
    FLEET,
    HOSTS,
    PROFILE,
    STOP_LIMIT,
    FleetRig,
    TokenPoller,
    fleet_rig,
    wait_until,
)
from tests.bench_procs import Daemon, Row, Sandbox, row
from tests.bench_reads import compare, drive, token_reader

__all__ = ["fleet_rows"]

#: Reads on a follower never touch etcd, so they should match the single-host daemon's; one
#: trial on this 2-core VM varies by far more than the 10% allowed for noise.
READ_TARGET = 0.9
#: The design's fewest etcd requests for one refresh by the owner's courier: read the chain,
#: commit the journal entry, check the lease just before sending, commit the outcome; and the
#: daemon's read of the chain it committed when the courier is done.
MIN_REQUESTS = 5
#: A follower serves the new token once the watch delivers the commit and the record is
#: unsealed: tens of etcd round trips at most on loopback.
PROPAGATION_TARGET_MS = 100.0
#: Requests a host makes whether it refreshes or not: the lease's keepalives, and the watches
#: (re)opened. They are shown per second while idle, and not counted per refresh.
BACKGROUND = {"/v3/lease/keepalive", "/v3/watch"}
#: daemon/main.py: SIGTERM ends the daemon within 2 s.
STOP_PROMISE = 2.0
#: Puts timed for the baseline of the propagation rows.
PUTS = 40


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _refresh(daemon: Daemon) -> float:
    """A forced refresh through the control socket that rotated the token; its wall ms."""
    before = read_token(daemon.token_socket(PROFILE))
    start = time.perf_counter()
    daemon.control("refresh", profile=PROFILE)
    elapsed = (time.perf_counter() - start) * 1000
    if read_token(daemon.token_socket(PROFILE)) == before:
        raise SystemExit("fleet benchmark: a forced refresh did not rotate the token")
    return elapsed


def _put_round_trips(rig: FleetRig) -> list[float]:
    client = EtcdClient(rig.cluster.endpoints)
    key = b"/aac-tokend-bench/put"
    times = []
    for i in range(PUTS + 1):
        start = time.perf_counter()
        client.put(key, str(i).encode())
        times.append((time.perf_counter() - start) * 1000)
    return times[1:]  # the first one opens the connection


def _granted_ttl(rig: FleetRig) -> int:
    client = EtcdClient(rig.cluster.endpoints)
    owner = client.get(FleetKeys(FLEET).owner(PROFILE))
    info = client.time_to_live(owner.lease) if owner is not None else None
    if info is None:
        raise SystemExit("fleet benchmark: no owner lease to read the granted TTL of")
    return info.granted_ttl


def _refresh_rows(rig: FleetRig, single: Daemon, refreshes: int, idle: float) -> list[Row]:
    owner, follower = rig.hosts[HOSTS[0]], rig.hosts[HOSTS[1]]
    puts = _put_round_trips(rig)
    mark = len(rig.proxy.replies)
    time.sleep(idle)
    idle_counts = Counter(r.path for r in rig.proxy.since(mark))
    poller = TokenPoller(follower.token_socket(PROFILE))
    fleet_ms: list[float] = []
    single_ms: list[float] = []
    lag_ms: list[float] = []
    try:
        poller.arm()  # warm-up: the connections, and the first spare courier (started then)
        _refresh(owner)
        poller.changed_at()
        _refresh(single)
        mark = len(rig.proxy.replies)
        busy = time.monotonic()
        for _ in range(refreshes):
            single_ms.append(_refresh(single))
            rig.spare_ready(HOSTS[0])
            owner_mark = len(rig.proxy.replies)
            poller.arm()
            fleet_ms.append(_refresh(owner))
            served = poller.changed_at()
            # The outcome commit: the last transaction sent before the follower served (the
            # journal's comes before it). Its answer may pass the proxy a little after the
            # follower's watch event: the figure can then be slightly negative.
            commits = [r.answered for r in rig.proxy.since(owner_mark)
                       if r.path == "/v3/kv/txn" and r.sent <= served]  # fmt: skip
            if not commits or commits[-1] is None:
                raise SystemExit("fleet benchmark: the follower served before any commit")
            lag_ms.append((served - commits[-1]) * 1000)
        busy = time.monotonic() - busy
        busy_replies = rig.proxy.since(mark)
        busy_counts = Counter(r.path for r in busy_replies)
    finally:
        poller.close()
    per_refresh = {
        path.removeprefix("/v3/"): (busy_counts[path] - idle_counts[path] * busy / idle) / refreshes
        for path in sorted(set(busy_counts) - BACKGROUND)
    }
    total = sum(per_refresh.values())
    etcd_ms = sum((r.answered or r.sent) - r.sent for r in busy_replies
                  if r.path not in BACKGROUND) * 1000 / refreshes  # fmt: skip
    counted = ", ".join(f"{p} {n:.1f}" for p, n in per_refresh.items() if abs(n) >= 0.05)
    idle_seen = ", ".join(f"{p.removeprefix('/v3/')} {n / idle:.1f}"
                          for p, n in sorted(idle_counts.items()))  # fmt: skip
    fork, fleet = _median(single_ms), _median(fleet_ms)
    return [
        row(f"etcd requests per fleet refresh ({counted})", total, "requests", MIN_REQUESTS,
            "design minimum (read, journal, lease check, outcome, daemon's re-read)",
            target=f"<= {MIN_REQUESTS + 2}", met=total <= MIN_REQUESTS + 2),
        row(f"  idle etcd requests/s of the owner ({idle_seen})", sum(idle_counts.values()) /
            idle, "req/s", None, "-", target="info"),
        row(f"owner's etcd commit to follower serving, p50 ({refreshes} refreshes)",
            _median(lag_ms), "ms", _median(puts), f"etcd put round trip p50 ({PUTS} puts)",
            target=f"<= {PROPAGATION_TARGET_MS:.0f} ms",
            met=_median(lag_ms) <= PROPAGATION_TARGET_MS),
        row(f"  owner's etcd commit to follower serving, p99 ({refreshes} refreshes)",
            _p99(lag_ms), "ms", _p99(puts), f"etcd put round trip p99 ({PUTS} puts)",
            target=f"<= {PROPAGATION_TARGET_MS:.0f} ms",
            met=_p99(lag_ms) <= PROPAGATION_TARGET_MS),
        row(f"forced refresh via the fleet courier, median ({refreshes} runs): {fleet - fork:+.0f}"
            " ms", fleet, "ms", fork, f"single-host fork courier median ({refreshes} runs)",
            target=f"<= {RATIO_TARGET}x or +{EXTRA_TARGET_MS:.0f} ms",
            met=fleet <= fork * RATIO_TARGET or fleet - fork <= EXTRA_TARGET_MS),
        row("  of it waiting on etcd, mean (the counted requests' round trips)", etcd_ms, "ms",
            fleet - fork, "the fleet refresh's time over the fork courier's", target="info"),
    ]  # fmt: skip


def _read_rows(rig: FleetRig, single: Daemon, trial: float, rounds: int, clients: int) -> list[Row]:
    follower = rig.hosts[HOSTS[1]]
    got = compare({
        "single": partial(drive, token_reader, single.token_socket(PROFILE), clients, trial,
                          single.pid),
        "follower": partial(drive, token_reader, follower.token_socket(PROFILE), clients, trial,
                            follower.pid),
    }, rounds)  # fmt: skip
    base, mine = got["single"], got["follower"]
    return [
        row(f"token reads/s on a follower, {clients} clients", mine["rate"], "reads/s",
            base["rate"], "single-host daemon, same read loop",
            target=f"1.0x (>= {READ_TARGET}x)", met=mine["rate"] / base["rate"] >= READ_TARGET),
        row(f"  token read p99 on a follower, {clients} clients", mine["p99"], "us", base["p99"],
            "single-host daemon p99", target="info"),
    ]  # fmt: skip


def _failover_rows(rig: FleetRig, failovers: int) -> list[Row]:
    ttl = _granted_ttl(rig)
    # The demo's timings leave keepalive_fraction at its default.
    period = ttl * FleetSettings.keepalive_fraction
    owned: list[float] = []
    refreshed: list[float] = []
    for i in range(failovers):
        if i:
            rig.start(rig.dead())  # the last victim, back as a follower
        took_over, refreshed_at = _failover(rig)
        owned.append(took_over)
        refreshed.append(refreshed_at)
    target = ttl + period
    return [
        row(f"failover after an owner SIGKILL: a follower owns it, median ({failovers} kills)",
            _median(owned), "s", ttl, "lease TTL etcd granted", target=f"<= TTL + keepalive "
            f"period ({target:.1f} s)", met=_median(owned) <= target),
        row(f"  failover until the new owner's forced refresh succeeded, median ({failovers})",
            _median(refreshed), "s", ttl, "lease TTL etcd granted",
            target=f"<= TTL + period + 1 s ({target + 1:.1f} s)", met=_median(refreshed) <=
            target + 1),
    ]  # fmt: skip


def _failover(rig: FleetRig) -> tuple[float, float]:
    """SIGKILL the owner: seconds until another host owns the chain, and until it refreshed."""
    victim = rig.owner()
    if victim is None:
        raise SystemExit("fleet benchmark: no owner to kill")
    before = read_token(rig.hosts[victim].token_socket(PROFILE))
    rig.hosts[victim].proc.kill()
    killed = time.monotonic()
    rig.hosts[victim].proc.wait()  # rig.owner() asks only the hosts still running
    owned = wait_until("a new owner", lambda: rig.owner() is not None) - killed
    heir = rig.hosts[rig.owner() or ""]
    refreshed = wait_until("a refresh by the new owner", lambda: _rotated(heir, before), 0.05)
    return owned, refreshed - killed


def _rotated(daemon: Daemon, before: str) -> bool:
    with ControlClient(daemon.control_socket, timeout=30.0) as client:
        answer = client.request("refresh", profile=PROFILE)
    return answer.get("ok") is True and read_token(daemon.token_socket(PROFILE)) != before


def fleet_rows(
    sandbox: Sandbox,
    single: Daemon,
    *,
    refreshes: int,
    failovers: int,
    trial: float,
    rounds: int,
) -> list[Row]:
    """Every fleet row, with ``single`` (the single-host daemon serving "default") beside."""
    idle = float(FLEET_TIMINGS["lease_ttl_seconds"]) * 1.5  # two keepalives at least
    with fleet_rig(sandbox) as rig:
        rows = _refresh_rows(rig, single, refreshes, idle)
        rows += _read_rows(rig, single, trial, rounds, 16)
        rows += _failover_rows(rig, failovers)
        slowest = rig.stop_all()
    rows.append(row(f"fleet daemons' stop after SIGTERM, slowest of {len(HOSTS)}", slowest,
                    "s", None, "-", target=f"<= {STOP_PROMISE:.0f} s (killed at {STOP_LIMIT:.0f})",
                    met=slowest <= STOP_PROMISE))  # fmt: skip
    return rows

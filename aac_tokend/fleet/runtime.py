"""Fleet mode on one host: etcd, the chains, ownership and the watch, wired for the engine.

Built by the daemon only when config.toml has a ``[fleet]`` table (the daemon imports this
module inside a function), and before any thread of its own starts: the fenced courier is
spawned, never forked from this threaded process (fleet/courier.py). It is the engine's
``FleetView`` (daemon/fleet_view.py): who may refresh a fleet profile (its elected owner,
only), how early to stop serving (the fleet's clock skew) and the ``fleet`` object of each
status row. The follower's watch hands every chain record to ``Engine.follow``.

An owner that cannot do the job steps down and keeps out of the election for a while, so a
healthy host takes over before the access token expires: after ``STEP_DOWN_AFTER`` refreshes
in a row that did not reach the token endpoint, or a courier that could not open the chain
(a fleet key that is not the fleet's). Never for an outcome etcd could not take (this host
holds that pair and pushes it) or a rollback (see ``_judge``).

Longer than 300 lines because it is the one place where fleet mode's parts meet the engine:
building them, the engine's view, the refresher with its step-down rule, the callbacks.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from ..core.outcome import FailureKind
from ..core.state import ProfileState
from ..errors import AacTokendError, RollbackError
from ..host.paths import Paths
from ..refresh.courier import CourierJob, Refresher
from ..refresh.result import CourierKind, CourierResult
from ..store.files import CRYPTO_LOCK
from ..store.interface import StateStore
from .chains import FleetChains, Versioned
from .clocks import suspend_clock
from .connect import connect, read_password
from .courier import FleetCourier, FleetSpec
from .election import Elector
from .fenced import FleetJob
from .follow import ChainFollower
from .highwater import HighWater
from .keys import FleetKeys
from .lease import LeaseKeeper
from .routing import RoutingRefresher, RoutingStore
from .sealing import Sealer, load_fleet_key
from .settings import FleetSettings
from .store import FleetStore

__all__ = ["STEP_DOWN_AFTER", "FleetRuntime"]

log = structlog.get_logger("aac_tokend.fleet")

#: Refreshes in a row that never reached the token endpoint before an owner steps down:
#: two, so one network blip does not move the chain, while a host whose route to AAC is
#: gone hands over well inside the refresh margin (which leaves room for a failover).
STEP_DOWN_AFTER = 2
#: How long a host that stepped down stays out of that profile's election, in lease TTLs:
#: long enough for another host to win, short enough that a fleet of hosts that all fail
#: keeps trying.
STEP_DOWN_BACKOFF_TTLS = 6
#: The clock skew shown is the least of this many recent samples (each adds a latency).
SKEW_SAMPLES = 5


class FleetRuntime:
    """Fleet mode's parts on this host, and the engine's view of them."""

    def __init__(
        self,
        settings: FleetSettings,
        paths: Paths,
        *,
        local_store: StateStore,
        local_refresher: Refresher,
    ) -> None:
        self.settings = settings
        self.host = settings.host or socket.gethostname()
        key = load_fleet_key(paths.config_dir)
        # Read once, here: the couriers get it on stdin with the spec, so a password file
        # rotated or gone while the daemon runs costs no refresh (it counts at the next start).
        password = (
            read_password(settings.password_file)
            if settings.user is not None and settings.password_file is not None
            else None
        )
        self.client = connect(settings, password=password)
        keys = FleetKeys(settings.name)
        sealer = Sealer(key, settings.name, lock=CRYPTO_LOCK)
        highwater = HighWater(paths.state_dir, settings.name)
        self.chains = FleetChains(self.client, keys, sealer, highwater)
        self.store = FleetStore(self.chains, paths.state_dir)
        # The keeper has a client of its own, each call bounded well inside one keepalive
        # period, and counts the lease on the suspend-counting clock: a host that slept
        # through its lease must not think it still holds it.
        period = settings.lease_ttl_seconds * settings.keepalive_fraction
        keeper_client = connect(
            settings,
            password=password,
            timeout=max(0.2, period * 0.8),
            connect_timeout=max(0.1, min(1.0, period * 0.4)),
        )
        self.leases = LeaseKeeper(
            keeper_client,
            settings.lease_ttl_seconds,
            settings.keepalive_fraction,
            monotonic=suspend_clock,
        )
        self._records: dict[str, Versioned] = {}
        self._skew: dict[str, float] = {}
        self._skew_samples: dict[str, list[float]] = {}
        self._follow: Callable[[ProfileState], bool] = lambda _state: False
        # The watches' read deadline: a stalled stream is noticed within a lease TTL.
        idle = float(max(settings.lease_ttl_seconds, 1))
        self.elector = Elector(
            self.client,
            keys,
            self.leases,
            self.host,
            self._covered,
            self._role_changed,
            watch_idle_seconds=idle,
        )
        self.follower: ChainFollower[Versioned] = ChainFollower(
            self.client,
            self.chains,
            keys,
            self._on_record,
            self._on_gone,
            suspend_clock,
            watch_idle_seconds=idle,
        )
        self._spec = FleetSpec(
            settings, self.host, 0, str(paths.state_dir), key, etcd_password=password
        )
        self._courier = FleetCourier(self._spec)
        #: What the engine uses: fleet profiles here, the others on the local files.
        self.routed_store = RoutingStore(local_store, self.store, self.covers, settings.name)
        self.routed_refresher = RoutingRefresher(local_refresher, self, self.covers)
        self._lock = threading.Lock()
        self._started = False

    # -- lifecycle --------------------------------------------------------------------
    def start(self, follow: Callable[[ProfileState], bool]) -> None:
        """Take a lease, start the watch and the election; ``follow`` is ``Engine.follow``."""
        self._follow = follow
        self.leases.start()
        self.follower.start()
        self.elector.start()
        # A warm courier on every host, follower or not: a follower that becomes owner
        # refreshes at once, not after an interpreter's start (1-2 s on a loaded host) on
        # the failover path, where the refresh margin is already spent on the handover.
        threading.Thread(target=self._courier.prepare, name="courier-warm", daemon=True).start()
        self._started = True

    def close(self) -> None:
        """Let go: revoke the lease (another host takes over at once), stop the threads.

        Within the daemon's 2 s stop: the lease goes first, then each thread's watch is
        closed and its join is short (they are daemon threads; the process exits after the
        daemon stops). The spare courier is let go without waiting for it: it reads EOF and
        ends, as the single-host daemon's spare does when the daemon exits.
        """
        if not self._started:
            return
        self.leases.close()
        self.elector.close()
        self.follower.close()
        self._courier.close(timeout=0.0)

    # -- the engine's FleetView -----------------------------------------------------------
    def covers(self, name: str) -> bool:
        return self.settings.covers(name)

    def may_refresh(self, name: str) -> bool:
        return not self.covers(name) or self.elector.is_owner(name)

    def serve_margin(self, name: str) -> float:
        return self.settings.max_clock_skew_seconds if self.covers(name) else 0.0

    def facts(self, name: str) -> dict[str, Any] | None:
        if not self.covers(name):
            return None
        owner = self.elector.owner_of(name)
        mine = self.elector.is_owner(name)
        skew = self._skew.get(name)
        facts: dict[str, Any] = {
            "host": self.host,
            "role": "owner" if mine else "follower",
            "owner": owner,
            "lease_left_seconds": round(self.leases.left(), 1) if mine else None,
            "etcd": "ok" if self.follower.healthy() else "unreachable",
            "clock_skew_seconds": None if skew is None else round(skew, 3),
        }
        if skew is not None and abs(skew) > self.settings.max_clock_skew_seconds:
            facts["clock_warning"] = (
                f"this host's clock is {skew:+.1f} s off the owner's, more than "
                f"max_clock_skew_seconds ({self.settings.max_clock_skew_seconds:g}); fix NTP"
            )
        return facts

    # -- the fleet's refresher ------------------------------------------------------------
    def refresh(self, job: CourierJob) -> CourierResult:
        """One fenced refresh of a fleet profile (the engine's Refresher for it)."""
        if not self.elector.is_owner(job.profile):
            return CourierResult(CourierKind.STATE_CHANGED, "not this host's chain now")
        seen = attempt = None
        record = self._records.get(job.profile)
        if record is not None and record.record.unresolved is not None:
            attempt = record.record.unresolved.id
            seen = self.follower.first_seen(attempt)
        fleet_job = FleetJob(
            job.profile,
            job.refresh_token,
            lifetime_days=job.lifetime_days,
            generation=job.generation,
            inherited_seen_at=seen,
            inherited_attempt=attempt,
        )
        # The job carries the lease this host holds now: the journal commit compares it.
        self._courier.update(dataclasses.replace(self._spec, lease_id=self.leases.lease_id))
        result = self._courier.refresh(fleet_job)
        try:
            self._judge(job.profile, result)
        except Exception as exc:
            # A step-down that cannot reach etcd must never cost the engine the result: it
            # may hold the only copy of a rotated pair (a kept outcome to push).
            log.warning("fleet_step_down_failed", profile=job.profile, error=str(exc))
        return result

    def _judge(self, name: str, result: CourierResult) -> None:
        """Step down where this host cannot do the job (module docstring).

        Not on an outcome etcd could not take (STORAGE_FAILED): this host holds the pair and
        pushes it when etcd is back; an heir would resolve the entry as ambiguous and lose
        it. Not on a rollback either: every host that saw the newer chain refuses the older
        one, and a step-down would hand the chain to a host that cannot tell.
        """
        why = None
        if result.kind is CourierKind.CORRUPT:
            if self._rolled_back(name):
                log.error("fleet_rollback_refused", profile=name, detail=result.detail)
                return
            why = "the courier could not read the chain (another fleet key?)"
        elif result.kind is CourierKind.TRANSIENT:
            try:
                state = self.store.load(name)
            except AacTokendError:
                state = None
            if (
                state is not None
                and state.consecutive_failures >= STEP_DOWN_AFTER
                and state.last_failure is FailureKind.UNREACHED
            ):
                why = f"{state.consecutive_failures} refreshes in a row did not reach AAC"
        if why is not None:
            backoff = STEP_DOWN_BACKOFF_TTLS * self.leases.granted_ttl
            log.warning("fleet_step_down", profile=name, host=self.host, reason=why)
            self.elector.step_down(name, why, backoff)

    def _rolled_back(self, name: str) -> bool:
        try:
            self.chains.read(name)
        except RollbackError:
            return True
        except AacTokendError:  # corrupt, or out of reach: not a rollback as far as we know
            pass
        return False

    # -- callbacks from the threads -------------------------------------------------------
    def _covered(self) -> list[str]:
        return sorted(name for name in self._records if self.covers(name))

    def _role_changed(self, name: str) -> None:
        log.info("fleet_role", profile=name, host=self.host,
                 role="owner" if self.elector.is_owner(name) else "follower")  # fmt: skip

    def _on_record(self, name: str, versioned: Versioned) -> None:
        with self._lock:
            live = name in self._records  # the first record of a profile may be old news
            self._records[name] = versioned
        record = versioned.record
        if (
            live
            and record.resolved is not None
            and record.state.last_refresh_at is not None
            and record.state.last_refresh_at == record.state.access_obtained_at
        ):
            # The owner's wall clock at its answer, seen here later by the commit's and the
            # watch's latency (more after a watch break): every sample is the skew plus a
            # delay, so the least of the recent ones is the best estimate.
            sample = time.time() - record.state.access_obtained_at
            recent = [*self._skew_samples.get(name, [])[-(SKEW_SAMPLES - 1) :], sample]
            self._skew_samples[name] = recent
            self._skew[name] = min(recent)
        if self.covers(name):
            self._follow(record.state)

    def _on_gone(self, name: str) -> None:
        with self._lock:
            self._records.pop(name, None)

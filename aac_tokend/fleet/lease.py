"""The owner's lease: granted at the TTL etcd chose, renewed on a thread of its own.

Two rules of issue #13 item 3 live here:

- the TTL used is the one etcd GRANTED (it raises a request below its minimum, 1.5
  election timeouts), never the one asked for;
- ``expires_at`` counts from when a keepalive was SENT, not from when its answer came
  back: etcd restarts the lease's clock when it receives the keepalive, which is after we
  sent it, so send time + TTL is never later than etcd's own expiry. Counting from the
  answer would let a slow answer stretch our belief past the lease's real end.

The keeper's thread makes no other call and nothing on the refresh path waits for it; each
of its calls is bounded by the client's timeout, so give it a client whose timeout is well
under ``granted_ttl * keepalive_fraction``. In the daemon, pass the suspend-counting clock
as ``monotonic`` (issue #13's CLOCK_BOOTTIME): Linux's CLOCK_MONOTONIC stops during a
suspend, so a lease counted on it would seem to outlive the suspend that ended it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import structlog

from ..errors import AacTokendError, TransientError
from .etcd import EtcdClient

__all__ = ["LeaseKeeper"]

log = structlog.get_logger("aac_tokend.fleet.lease")

#: After a keepalive or grant that did not reach etcd, try again this soon: a member may be
#: down while the others are up, and the lease has at most two thirds of its TTL left.
RETRY_SECONDS = 0.25
#: The keeper never sleeps longer than this in one go: a monotonic wait does not count a
#: suspend, so after a resume the lease (surely gone by then) is renewed or replaced within
#: this, not after what was left of a wait begun before the suspend.
MAX_SLEEP_SECONDS = 1.0
#: close() waits this long for the keeper thread after revoking: at most one bounded call
#: is in progress, and a stopping daemon does not wait for it (a daemon thread).
JOIN_SECONDS = 0.5


class LeaseKeeper:
    """One lease kept alive; ``on_lost`` listeners hear when etcd says it is gone."""

    def __init__(
        self,
        client: EtcdClient,
        ttl: int,
        keepalive_fraction: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 1 or not 0 < keepalive_fraction < 1:
            raise ValueError("a lease TTL is at least 1 s and its keepalive fraction in (0, 1)")
        self._client = client
        self._ttl = ttl
        self._fraction = keepalive_fraction
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._lease_id = 0
        self._granted_ttl = 0
        self._expires_at = float("-inf")
        self._sent_at = float("-inf")
        self._listeners: list[Callable[[int], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what others read ------------------------------------------------------------

    @property
    def lease_id(self) -> int:
        """The current lease (0: none, before start() or while a lost one is replaced)."""
        with self._lock:
            return self._lease_id

    @property
    def granted_ttl(self) -> int:
        """The TTL etcd granted the current lease, in seconds (0: none)."""
        with self._lock:
            return self._granted_ttl

    @property
    def expires_at(self) -> float:
        """When the lease surely still lives until (monotonic): last send + granted TTL."""
        with self._lock:
            return self._expires_at

    def left(self) -> float:
        """Seconds the lease surely has left (0 if none or past its end)."""
        return max(0.0, self.expires_at - self._monotonic())

    def on_lost(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(old_lease_id)`` when etcd says a lease is gone and a new one is
        granted (from the keeper's thread: it must return promptly)."""
        with self._lock:
            self._listeners.append(callback)

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        """Grant the lease and start renewing it. If etcd cannot be reached now, the thread
        keeps trying (``lease_id`` stays 0 until then): a host that starts during an etcd
        outage follows and serves meanwhile. Refused credentials (an AlertError) raise."""
        try:
            self._grant()
        except TransientError as exc:
            log.warning("fleet_lease_unreachable", lease=0, error=str(exc))
        self._thread = threading.Thread(target=self._run, name="fleet-lease", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Revoke the lease first (its keys go at once: another host takes over), then stop
        renewing; best effort. A keepalive in flight meanwhile finds the lease gone and,
        stopped, grants no other."""
        self._stop.set()
        with self._lock:
            lease, self._lease_id = self._lease_id, 0
            self._expires_at = float("-inf")
        if lease:
            self._revoke(lease)
        if self._thread is not None:
            self._thread.join(JOIN_SECONDS)

    def _revoke(self, lease: int) -> None:
        with contextlib.suppress(AacTokendError):  # gone already, or unreachable
            self._client.revoke(lease)

    # -- the keeper --------------------------------------------------------------------

    def _grant(self) -> None:
        sent = self._monotonic()
        lease = self._client.grant(self._ttl)
        with self._lock:
            stopped = self._stop.is_set()
            if not stopped:
                self._lease_id, self._granted_ttl = lease.id, lease.ttl
                self._sent_at, self._expires_at = sent, sent + lease.ttl
        if stopped:  # close() came while etcd granted it: no keys are bound to it yet
            self._revoke(lease.id)
            return
        log.info("fleet_lease_granted", lease=lease.id, ttl=lease.ttl, asked=self._ttl)

    def renew(self) -> bool:
        """One keepalive now; False if etcd could not be reached. A lease etcd says is gone
        is replaced by a new one and the listeners are told."""
        with self._lock:
            lease = self._lease_id
        try:
            if not lease:
                self._grant()
                return True
            sent = self._monotonic()
            ttl = self._client.keepalive(lease)
        except AacTokendError as exc:  # unreachable, or auth: the time left runs down
            log.warning("fleet_lease_unreachable", lease=lease, error=str(exc))
            return False
        if ttl > 0:
            with self._lock:
                if self._lease_id == lease:
                    self._sent_at, self._expires_at = sent, sent + ttl
            return True
        self._replace(lease)
        return True

    def _replace(self, lost: int) -> None:
        with self._lock:
            if self._lease_id != lost:
                return
            self._lease_id, self._granted_ttl = 0, 0
            self._expires_at = float("-inf")
            listeners = list(self._listeners)
        log.warning("fleet_lease_lost", lease=lost)
        try:
            self._grant()
        except AacTokendError as exc:
            log.warning("fleet_lease_unreachable", lease=0, error=str(exc))
        for callback in listeners:
            callback(lost)

    def _until_due(self) -> float:
        """Seconds until the next keepalive is due (0: now, or no lease to renew)."""
        with self._lock:
            if not self._lease_id:
                return 0.0
            due = self._sent_at + self._granted_ttl * self._fraction
        return max(0.0, due - self._monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self._until_due()
            if wait > 0:
                self._stop.wait(min(wait, MAX_SLEEP_SECONDS))
            elif not self.renew():
                self._stop.wait(RETRY_SECONDS)

"""Who owns which profile: one lease-bound owner key per profile, watched by every host.

A host's view of the owners is exactly the owner keys it has read and watched (issue #13
item 3): a follower treats the owner as alive while the key exists and never by a timer of
its own, so a follower that was paused and wakes up still sees an owner whose lease lived
on, and sees no owner once etcd has deleted the key (its lease expired, or it stepped down).

Two threads: the watcher keeps the view (range, then watch from the range's revision + 1,
re-reading after a compaction or a lost etcd), and the campaigner tries to create the owner
key of every covered profile the view shows without one (compare create_revision == 0),
bound to our lease. Being the owner needs more than the key: its value is our host name AND
its lease is our current lease AND that lease surely still lives (LeaseKeeper.left()).

(Over 300 lines: the watcher, the campaigner and step_down share one view and its lock.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from ..errors import (
    AacTokendError,
    EtcdLeaseGoneError,
    EtcdWatchCompactedError,
)
from .etcd import Compare, DeleteOp, EtcdClient, PutOp, RangeOp, RangeResult, Watch, WatchEvent
from .etcd_watch import EventType
from .keys import FleetKeys, KeyKind
from .lease import LeaseKeeper

__all__ = ["Elector", "Owner"]

log = structlog.get_logger("aac_tokend.fleet.election")

#: The campaigner looks again at least this often even if nothing woke it: a profile list
#: that changed, or a backoff that ended, is noticed within it.
CAMPAIGN_EVERY_SECONDS = 1.0
#: After losing etcd, the watcher reads again this soon (a member can fail over in ~1 s).
REREAD_PAUSE_SECONDS = 0.25
#: close() waits this long for each thread: closing the watch ends a blocked read at once,
#: and a bounded etcd call in flight is not worth holding up a stop for (daemon threads).
JOIN_SECONDS = 0.5


@dataclass(frozen=True)
class Owner:
    """An owner key as seen: the host it names, its lease and its mod revision."""

    host: str
    lease: int
    revision: int


class Elector:
    """Campaigns for covered profiles and tells who owns each (see the module docstring).

    ``on_change(profile)`` is called when the profile's owner key changed in this host's
    view or this host's role changed; it runs on the elector's, the lease keeper's or
    step_down's caller's thread, so it must return promptly and ask ``is_owner`` itself.
    """

    def __init__(
        self,
        client: EtcdClient,
        keys: FleetKeys,
        leases: LeaseKeeper,
        host: str,
        profiles: Callable[[], Iterable[str]],
        on_change: Callable[[str], None],
        monotonic: Callable[[], float] = time.monotonic,
        *,
        watch_idle_seconds: float = 10.0,
    ) -> None:
        self._client = client
        self._keys = keys
        self._leases = leases
        self._host = host
        self._profiles = profiles
        self._on_change = on_change
        self._monotonic = monotonic
        self._idle = watch_idle_seconds
        self._lock = threading.Lock()
        self._owners: dict[str, Owner] = {}
        #: the last revision applied per profile (a put or a delete): older news is ignored
        self._applied: dict[str, int] = {}
        self._synced = False
        self._backoff_until: dict[str, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch: Watch | None = None  # the open watch, for close() to end
        leases.on_lost(self._lease_lost)

    # -- what others ask ---------------------------------------------------------------

    def owner_of(self, profile: str) -> str | None:
        """The host whose owner key exists for ``profile`` (None: no owner key)."""
        with self._lock:
            owner = self._owners.get(profile)
        return owner.host if owner else None

    def is_owner(self, profile: str) -> bool:
        """This host owns ``profile``: the key names us, under our current, living lease."""
        lease = self._leases.lease_id
        with self._lock:
            owner = self._owners.get(profile)
        return (
            owner is not None
            and lease != 0
            and owner.host == self._host
            and owner.lease == lease
            and self._leases.left() > 0
        )

    def lease_left(self) -> float:
        """Seconds our lease surely has left."""
        return self._leases.left()

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching the owner keys and campaigning."""
        for name, target in (("watch", self._watch_loop), ("campaign", self._campaign_loop)):
            thread = threading.Thread(target=target, name=f"fleet-elector-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def close(self) -> None:
        """Stop both threads (owner keys stay until our lease ends: LeaseKeeper.close)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.close()
        deadline = time.monotonic() + JOIN_SECONDS
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def wake(self) -> None:
        """Campaign now (the covered profiles changed)."""
        self._wake.set()

    # -- stepping down ------------------------------------------------------------------

    def step_down(self, profile: str, why: str, backoff: float) -> bool:
        """Give up ``profile``: delete its owner key if it is bound to our lease, and do not
        campaign for it for ``backoff`` seconds. True if our key was deleted.

        EtcdUnavailableError passes up (the lease then ends on its own, the backoff holds).
        """
        with self._lock:  # first, so the campaigner cannot take it straight back
            self._backoff_until[profile] = self._monotonic() + backoff
        lease = self._leases.lease_id
        if not lease:  # no lease: no key of ours (a compare with 0 would match unbound keys)
            return False
        key = self._keys.owner(profile)
        result = self._client.txn([Compare.lease(key, lease)], [DeleteOp(key)])
        if result.succeeded:  # our view at once: is_owner must not wait for the watch
            self._set(profile, None, result.revision)
        log.warning("fleet_stepped_down", profile=profile, why=why, backoff=backoff)
        return result.succeeded

    # -- the watcher ------------------------------------------------------------------

    def _watch_loop(self) -> None:
        prefix = self._keys.prefix(KeyKind.OWNER)
        while not self._stop.is_set():
            try:
                found = self._client.range(prefix, prefix=True)
                self._replace_view(found)
                with self._client.watch(
                    prefix,
                    prefix=True,
                    start_revision=found.revision + 1,
                    idle_timeout=self._idle,
                ) as watch:
                    with self._lock:
                        self._watch = watch
                    if self._stop.is_set():  # close() came before it could see this watch
                        return
                    for item in watch:
                        if self._stop.is_set():
                            return
                        if isinstance(item, WatchEvent):
                            self._apply(item)
            except EtcdWatchCompactedError:
                log.info("fleet_owner_watch_compacted")
            except Exception as exc:  # etcd lost, auth, a bug: the view may be stale, read again
                with self._lock:
                    self._synced = False
                log.warning("fleet_owner_watch_lost", error=str(exc), exc_info=_is_bug(exc))
                self._stop.wait(REREAD_PAUSE_SECONDS)

    def _replace_view(self, found: RangeResult) -> None:
        fresh: dict[str, Owner] = {}
        for kv in found.kvs:
            parsed = self._keys.parse(kv.key)
            if parsed is not None and parsed[0] is KeyKind.OWNER:
                fresh[parsed[1]] = Owner(
                    kv.value.decode(errors="replace"), kv.lease, kv.mod_revision
                )
        with self._lock:
            changed = {
                p for p in fresh.keys() | self._owners.keys() if fresh.get(p) != self._owners.get(p)
            }
            self._owners = fresh
            for profile in changed:
                self._applied[profile] = found.revision
            self._synced = True
        self._tell(changed)
        self._wake.set()

    def _apply(self, event: WatchEvent) -> None:
        parsed = self._keys.parse(event.key)
        if parsed is None or parsed[0] is not KeyKind.OWNER:
            return
        if event.type is EventType.DELETE:
            self._set(parsed[1], None, event.revision)
            self._wake.set()
        else:
            host = event.value.decode(errors="replace")
            self._set(parsed[1], Owner(host, event.lease, event.revision), event.revision)

    def _set(self, profile: str, owner: Owner | None, revision: int) -> None:
        """Apply news of ``revision`` about ``profile`` unless newer news is in already."""
        with self._lock:
            if revision <= self._applied.get(profile, 0):
                return  # a watch event our own txn applied already, or older news
            self._applied[profile] = revision
            if owner is None:
                self._owners.pop(profile, None)
            else:
                self._owners[profile] = owner
        self._tell({profile})

    def _tell(self, profiles: Iterable[str]) -> None:
        for profile in sorted(profiles):
            try:
                self._on_change(profile)
            except Exception:  # the listener's bug must not stop the view or the campaign
                log.exception("fleet_owner_listener_failed", profile=profile)

    def _lease_lost(self, old: int) -> None:
        with self._lock:
            ours = [p for p, o in self._owners.items() if o.host == self._host and o.lease == old]
        self._tell(ours)  # is_owner is already False for them: the lease id changed
        self._wake.set()

    # -- the campaigner -----------------------------------------------------------------

    def _campaign_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._campaign()
            except EtcdLeaseGoneError:
                pass  # the keeper hears the same at its next keepalive and grants another
            except Exception as exc:  # etcd lost, auth, a bug: said, and tried again
                log.warning("fleet_campaign_failed", error=str(exc), exc_info=_is_bug(exc))
            now = self._monotonic()
            with self._lock:  # wake when the first backoff ends, if that is sooner
                ends = [until - now for until in self._backoff_until.values() if until > now]
            self._wake.wait(min([CAMPAIGN_EVERY_SECONDS, *ends]))

    def _campaign(self) -> None:
        lease = self._leases.lease_id
        if not lease or self._leases.left() <= 0:
            return
        covered = sorted(set(self._profiles()))  # outside the lock: it may ask us things
        now = self._monotonic()
        with self._lock:
            if not self._synced:
                return
            for profile, until in list(self._backoff_until.items()):
                if until <= now:
                    del self._backoff_until[profile]
            wanted = [p for p in covered if p not in self._owners and p not in self._backoff_until]
        for profile in wanted:
            if self._stop.is_set():
                return
            self._campaign_for(profile, lease)

    def _campaign_for(self, profile: str, lease: int) -> None:
        key = self._keys.owner(profile)
        result = self._client.txn(
            [Compare.create_revision(key, 0)],
            [PutOp(key, self._host.encode(), lease)],
            [RangeOp(key)],
        )
        if result.succeeded:
            owner = Owner(self._host, lease, result.revision)
        else:
            kvs = result.responses[0].kvs if isinstance(result.responses[0], RangeResult) else ()
            if not kvs:
                return  # deleted again since: the watch will tell, and we try next round
            kv = kvs[0]
            owner = Owner(kv.value.decode(errors="replace"), kv.lease, kv.mod_revision)
        if result.succeeded:
            log.info("fleet_owner_elected", profile=profile, host=self._host, lease=lease)
        self._set(profile, owner, owner.revision)


def _is_bug(exc: Exception) -> bool:
    """Not one of ours (etcd lost, auth): worth its traceback in the log."""
    return not isinstance(exc, AacTokendError)

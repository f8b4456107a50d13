"""Every host's copy of the fleet's chains: read them all, then watch them change.

The follower reads every chain key (``FleetChains.read_all``), then watches the chain prefix
from that read's revision + 1 with progress notifications and an idle read deadline
(etcd_watch.Watch resumes a broken stream from the last revision + 1 by itself). If the
watch gives up (etcd unreachable) or etcd has compacted the revisions it needed, everything
is read again. Each profile's records are delivered in revision order and each revision at
most once: a re-read delivers only what is newer than what was delivered.

``first_seen`` remembers, per profile, when (on the host's suspend-counting clock) this
host first saw the unresolved journal entry it now holds: a new owner waits W from then
before resolving it (issue #13 item 6). Only the earliest sighting counts, however often
the entry is read again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Generic, Protocol, TypeVar

import structlog

from ..errors import AacTokendError, EtcdWatchCompactedError
from .etcd import EtcdClient, KeyValue, Watch, WatchEvent
from .etcd_watch import EventType
from .keys import FleetKeys, KeyKind
from .records import ChainRecord

__all__ = ["ChainFollower", "ChainReader", "VersionedRecord"]

log = structlog.get_logger("aac_tokend.fleet.follow")

#: After losing etcd, read everything again this soon (a member can fail over in ~1 s).
REREAD_PAUSE_SECONDS = 0.25
#: close() waits this long for the thread: closing the watch ends a blocked read at once,
#: and a bounded read_all in flight is not worth holding up a stop for (a daemon thread).
JOIN_SECONDS = 0.5
#: healthy() allows this many read deadlines of silence: an idle stream is dropped after
#: one and reopened, and a working etcd answers the reopening at once (etcd's progress
#: interval may be 10 min), so silence past two means etcd did not answer.
HEALTHY_DEADLINES = 2.0


class VersionedRecord(Protocol):
    """A chain record and its key's mod revision (chains.Versioned)."""

    @property
    def record(self) -> ChainRecord: ...

    @property
    def revision(self) -> int: ...


V = TypeVar("V", bound=VersionedRecord)
V_co = TypeVar("V_co", bound=VersionedRecord, covariant=True)


class ChainReader(Protocol[V_co]):
    """What the follower needs of chains.FleetChains."""

    def read_all(self) -> tuple[Mapping[str, V_co | AacTokendError], int]: ...

    def open(self, profile: str, kv: KeyValue) -> V_co: ...


class ChainFollower(Generic[V]):
    """Delivers every chain record of the fleet, in order, once (see the module docstring).

    ``on_record`` and ``on_gone`` run on the follower's thread; they must return promptly.
    """

    def __init__(
        self,
        client: EtcdClient,
        chains: ChainReader[V],
        keys: FleetKeys,
        on_record: Callable[[str, V], None],
        on_gone: Callable[[str], None],
        boottime: Callable[[], float],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        watch_idle_seconds: float = 10.0,
    ) -> None:
        self._client = client
        self._chains = chains
        self._keys = keys
        self._on_record = on_record
        self._on_gone = on_gone
        self._boottime = boottime
        self._monotonic = monotonic
        self._idle = watch_idle_seconds
        self._lock = threading.Lock()
        #: per profile, the revision last delivered (a put) or applied (a delete)
        self._delivered: dict[str, int] = {}
        self._present: set[str] = set()
        #: per profile, (attempt id, boottime first seen) of the unresolved entry it holds
        self._seen: dict[str, tuple[str, float]] = {}
        #: etcd answered the last read or the watch (False until the first, and once lost)
        self._watching = False
        self._last_contact = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Watch | None = None  # the open watch, for close() to end

    # -- what others ask ---------------------------------------------------------------

    def first_seen(self, attempt_id: str) -> float | None:
        """When this host first saw the unresolved journal entry ``attempt_id`` (boottime)."""
        with self._lock:
            for ident, when in self._seen.values():
                if ident == attempt_id:
                    return when
        return None

    def healthy(self) -> bool:
        """etcd answered the last read or the watch, within HEALTHY_DEADLINES deadlines."""
        with self._lock:
            watching, contact = self._watching, self._last_contact
        return watching and self._monotonic() - contact <= self._idle * HEALTHY_DEADLINES

    def last_contact(self) -> float:
        """When etcd last answered the follower (monotonic; -inf: never)."""
        with self._lock:
            return self._last_contact

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the follower's thread."""
        self._thread = threading.Thread(target=self._run, name="fleet-follower", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread: its watch is closed, so a blocked read ends at once."""
        self._stop.set()
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.close()
        if self._thread is not None:
            self._thread.join(JOIN_SECONDS)

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        prefix = self._keys.prefix(KeyKind.CHAIN)
        while not self._stop.is_set():
            try:
                revision = self._read_all()
                with self._client.watch(
                    prefix, prefix=True, start_revision=revision + 1, idle_timeout=self._idle
                ) as watch:
                    with self._lock:
                        self._watch = watch
                    if self._stop.is_set():  # close() came before it could see this watch
                        return
                    self._contact()
                    for item in watch:
                        self._contact()
                        if self._stop.is_set():
                            return
                        if isinstance(item, WatchEvent):
                            self._event(item)
            except EtcdWatchCompactedError:
                log.info("fleet_chain_watch_compacted")
            except AacTokendError as exc:  # unreachable, or auth: keep the last records
                with self._lock:
                    self._watching = False
                log.warning("fleet_chain_watch_lost", error=str(exc))
                self._stop.wait(REREAD_PAUSE_SECONDS)
            except Exception:  # a bug or a garbled answer: said, and everything read again
                with self._lock:
                    self._watching = False
                log.exception("fleet_chain_watch_failed")
                self._stop.wait(REREAD_PAUSE_SECONDS)

    def _contact(self) -> None:
        with self._lock:
            self._last_contact = self._monotonic()
            self._watching = True

    def _read_all(self) -> int:
        found, revision = self._chains.read_all()
        # etcd answered: healthy already, while the records are handed over (the engine
        # may take a while with them) and before the watch opens
        self._contact()
        for profile in sorted(found):
            value = found[profile]
            if isinstance(value, AacTokendError):
                log.error("fleet_chain_unreadable", profile=profile, error=str(value))
            else:
                self._deliver(profile, value)
        with self._lock:
            gone = sorted(self._present - set(found))
        for profile in gone:
            self._gone(profile, revision)
        return revision

    def _event(self, event: WatchEvent) -> None:
        parsed = self._keys.parse(event.key)
        if parsed is None or parsed[0] is not KeyKind.CHAIN:
            return
        profile = parsed[1]
        if event.type is EventType.DELETE:
            self._gone(profile, event.revision)
            return
        with self._lock:
            # An old revision (a resumed stream's repeat after a re-read) is dropped before it
            # is opened: opening checks the high-water mark, which has moved past it, and it
            # would be reported as a rollback that never happened.
            if event.revision <= self._delivered.get(profile, 0):
                return
        kv = KeyValue(
            event.key,
            event.value,
            event.create_revision,
            event.revision,
            event.version,
            event.lease,
        )
        try:
            versioned = self._chains.open(profile, kv)
        except AacTokendError as exc:  # corrupt or a rollback: never used, said loudly
            log.error("fleet_chain_unreadable", profile=profile, error=str(exc))
            return
        self._deliver(profile, versioned)

    def _deliver(self, profile: str, versioned: V) -> None:
        with self._lock:
            if versioned.revision <= self._delivered.get(profile, 0):
                return  # seen already (a re-read, or a resumed stream's repeat)
            self._delivered[profile] = versioned.revision
            self._present.add(profile)
            attempt = versioned.record.unresolved
            if attempt is None:
                self._seen.pop(profile, None)
            elif self._seen.get(profile, ("", 0.0))[0] != attempt.id:
                self._seen[profile] = (attempt.id, self._boottime())
        try:
            self._on_record(profile, versioned)
        except Exception:  # the listener's bug must not stop the follower
            log.exception("fleet_record_listener_failed", profile=profile)

    def _gone(self, profile: str, revision: int) -> None:
        with self._lock:
            if revision <= self._delivered.get(profile, 0) or profile not in self._present:
                return
            self._delivered[profile] = revision
            self._present.discard(profile)
            self._seen.pop(profile, None)
        try:
            self._on_gone(profile)
        except Exception:
            log.exception("fleet_record_listener_failed", profile=profile)

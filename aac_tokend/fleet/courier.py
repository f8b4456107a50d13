"""The fleet courier process: a spawned courier that carries a fenced refresh.

Issue #13 item 10: the daemon in fleet mode runs threads that hold TLS state (the etcd
client's sessions, the lease keeper, the watch), so its courier is never forked from it. It
is spawned (refresh/spawn.py), with a warm spare waiting as on macOS. The spare is started
with ``--fleet`` (no secret: only what to do ahead), and the daemon writes the FleetSpec
first on its stdin (length-prefixed): the spare opens etcd's client, the chains and the
store before it says it is ready, so a refresh pays for the etcd round trips and the token
request, not for an interpreter nor for building a client (its TLS contexts alone cost
50-180 ms here). Measured on the 2-core machine under the other engineers' load, 30
interleaved refreshes each against the in-process sandbox and a 1-member etcd: warm fleet
courier median 57 ms, fork courier (single host, files) 57 ms, warm spawn courier (files)
41 ms; a cold fleet courier ~1.1 s. Before opening ahead the warm fleet courier took
163-245 ms. The job's own message carries the spec again and decides: a spare opened for
another fleet opens the job's afresh, and the lease is always the job's.

``FleetSpec`` is what the spawned side needs to open etcd and the chains: the fleet settings
(as a dict), this host's name, the lease the owner key is bound to, the state directory (the
high-water marks, the profile locks and the pending records), the fleet key itself and
etcd's password as the daemon read it at start. It travels on the courier's stdin with the
job, never in argv or the environment (the fleet key and the password are secrets), and
neither is in its repr.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..core.outcome import Transient
from ..errors import AacTokendError
from ..refresh.courier import MAX_LIFE_SECONDS
from ..refresh.result import CourierResult
from ..refresh.spawn import FLEET_FLAG, WAIT_MARGIN_SECONDS, SpawnCourier
from ..refresh.transaction import SAVE_RETRY_SECONDS, CourierJob
from .clocks import suspend_clock
from .connect import connect
from .connection import PreparedRequest, RequestTimeouts, open_request
from .fenced import FleetJob, carry_fenced
from .settings import FleetSettings

if TYPE_CHECKING:  # imported where they are built
    from .chains import FleetChains
    from .etcd import EtcdClient
    from .store import FleetStore

__all__ = ["FLEET_FLAG", "FleetCourier", "FleetSpec", "read_fleet_message"]


@dataclass(frozen=True)
class FleetSpec:
    """How a spawned courier opens the fleet: small and serialisable; the key in no repr."""

    settings: FleetSettings
    host: str
    lease_id: int
    state_dir: str
    fleet_key: bytes = field(repr=False)
    #: etcd's password, read once by the daemon (fleet/connect.py): a courier never reads
    #: the file, which may be gone or rotated by the time it runs.
    etcd_password: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dataclasses.asdict(self.settings),
            "host": self.host,
            "lease_id": self.lease_id,
            "state_dir": self.state_dir,
            "fleet_key": base64.b64encode(self.fleet_key).decode(),
            "etcd_password": self.etcd_password,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FleetSpec:
        raw = dict(data["settings"])
        raw["endpoints"] = tuple(raw["endpoints"])
        if raw.get("profiles") is not None:
            raw["profiles"] = tuple(raw["profiles"])
        return cls(
            FleetSettings(**raw),
            str(data["host"]),
            int(data["lease_id"]),
            str(data["state_dir"]),
            base64.b64decode(data["fleet_key"], validate=True),
            _password(data.get("etcd_password")),
        )


def _password(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError("etcd_password is not a string")


def fleet_message(spec: FleetSpec, job: CourierJob, deadline: float) -> bytes:
    """What a spawned fleet courier reads on stdin (spawn.py's message, with ``fleet``)."""
    seen = job.inherited_seen_at if isinstance(job, FleetJob) else None
    attempt = job.inherited_attempt if isinstance(job, FleetJob) else None
    data: dict[str, Any] = {
        "fleet": spec.to_dict(),
        "job": {
            "profile": job.profile,
            "refresh_token": job.refresh_token,
            "lifetime_days": job.lifetime_days,
            "generation": job.generation,
            "inherited_seen_at": seen,
            "inherited_attempt": attempt,
        },
        "deadline": deadline,
    }
    return json.dumps(data).encode()


def read_fleet_message(data: dict[str, Any]) -> tuple[FleetSpec, FleetJob, float]:
    """The spec, job and deadline of a parsed ``fleet_message``."""
    job = data["job"]
    days, generation, seen = (
        job.get("lifetime_days"),
        job.get("generation"),
        job.get("inherited_seen_at"),
    )
    fleet_job = FleetJob(
        str(job["profile"]),
        str(job["refresh_token"]),
        lifetime_days=float(days) if days is not None else None,
        generation=int(generation) if generation is not None else None,
        inherited_seen_at=float(seen) if seen is not None else None,
        inherited_attempt=str(job["inherited_attempt"]) if job.get("inherited_attempt") else None,
    )
    return FleetSpec.from_dict(data["fleet"]), fleet_job, float(data["deadline"])


@dataclass(frozen=True)
class OpenedFleet:
    """etcd's client, the chains and the store of one spec, opened by a spare ahead of its
    job: building the client alone costs 50-180 ms here (its TLS contexts)."""

    spec: FleetSpec
    client: EtcdClient
    chains: FleetChains
    store: FleetStore

    def serves(self, spec: FleetSpec) -> bool:
        """True if this is ``spec``'s fleet (the lease may have changed since: not opened)."""
        return dataclasses.replace(self.spec, lease_id=spec.lease_id) == spec


#: A greeting is a spec: a few hundred bytes, and the key. Anything larger is not one.
MAX_GREETING_BYTES = 65536


def open_ahead(stream: BinaryIO) -> OpenedFleet | None:
    """A fleet spare's start: the spec its daemon wrote first on stdin (length-prefixed;
    ``FleetCourier._greeting``), opened. None if it cannot be read or opened: the job's
    own spec is opened then, on the refresh's clock."""
    try:
        size = int.from_bytes(stream.read(4), "big")
        raw = stream.read(size) if 0 < size <= MAX_GREETING_BYTES else b""
        return open_fleet(FleetSpec.from_dict(json.loads(raw))) if raw else None
    except (ValueError, KeyError, TypeError, OSError, AacTokendError):
        return None


def open_fleet(spec: FleetSpec) -> OpenedFleet:
    """etcd's client, the chains and the store that ``spec`` names (no etcd call yet)."""
    from .chains import FleetChains
    from .highwater import HighWater
    from .keys import FleetKeys
    from .sealing import Sealer
    from .store import FleetStore

    settings = spec.settings
    state_dir = Path(spec.state_dir)
    client = connect(
        settings, password=spec.etcd_password, timeout=settings.connect_timeout_seconds
    )
    chains = FleetChains(
        client,
        FleetKeys(settings.name),
        Sealer(spec.fleet_key, settings.name),
        HighWater(state_dir, settings.name),
    )
    return OpenedFleet(spec, client, chains, FleetStore(chains, state_dir))


def carry_spawned(
    spec: FleetSpec,
    job: FleetJob,
    on_answer: Callable[[], None] | None = None,
    *,
    opened: OpenedFleet | None = None,
    life_ends: float | None = None,
) -> CourierResult:
    """The spawned side: the fenced refresh, on what the spare opened ahead if it is the
    job's fleet, else on a fresh opening of the job's spec. ``life_ends`` is when the
    courier's alarm ends it (``time.monotonic()``): no request leaves without its whole
    deadline before then."""
    if opened is None or not opened.serves(spec):
        opened = open_fleet(spec)
    settings = spec.settings
    client, chains, store = opened.client, opened.chains, opened.store
    timeouts = RequestTimeouts(
        settings.connect_timeout_seconds,
        settings.send_timeout_seconds,
        settings.request_deadline_seconds,
    )

    def prepare(url: str) -> PreparedRequest | Transient:
        return open_request(url, timeouts)

    return carry_fenced(
        job, store, chains, client, prepare, settings, spec.host, spec.lease_id,
        suspend_clock, time.time, on_answer=on_answer, life_ends=life_ends,
        retry_for=_outcome_retry(life_ends),
    )  # fmt: skip


#: Before the daemon stops waiting for its courier, the courier stops retrying its outcome
#: with this much to spare, and hands the pair over to be kept (pending) and pushed by it.
HANDOVER_SPARE_SECONDS = 1.5


def _outcome_retry(life_ends: float | None) -> float:
    """How long a courier keeps trying to commit its outcome while etcd is away: until
    just before the daemon gives up waiting for it (``life_ends`` + the wait's margin). An
    etcd cut that heals within that time costs nothing: the push lands at once, well before
    an heir's W runs out (a pair kept pending waits for the daemon's next tick)."""
    if life_ends is None:
        return SAVE_RETRY_SECONDS
    left = life_ends + WAIT_MARGIN_SECONDS - HANDOVER_SPARE_SECONDS - time.monotonic()
    return max(SAVE_RETRY_SECONDS, left)


class FleetCourier(SpawnCourier):
    """A Refresher for fleet profiles: SpawnCourier whose couriers carry fenced refreshes.

    ``spec`` may be replaced (``update``) when the lease changes: the next job carries it.
    """

    def __init__(self, spec: FleetSpec, **kwargs: Any) -> None:
        kwargs.setdefault("life", min(spec.settings.courier_life_seconds, MAX_LIFE_SECONDS))
        super().__init__(None, **kwargs)
        self._fleet = spec
        self._command = [*self._command, FLEET_FLAG]

    def _greeting(self) -> bytes:
        return json.dumps(self._fleet.to_dict()).encode()

    def update(self, spec: FleetSpec) -> None:
        """Jobs from now on carry ``spec`` (a new lease after the old one was lost)."""
        self._fleet = spec

    def _message(self, job: CourierJob, deadline: float) -> bytes:
        return fleet_message(self._fleet, job, deadline)

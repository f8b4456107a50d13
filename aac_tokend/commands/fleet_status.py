"""``aac-tokend fleet status``: etcd's health per member, and each fleet profile's owner.

Read-only: it changes no key. Reading a chain raises this host's high-water mark like any
read (``FleetChains.open``), which is right: a generation seen is seen. An unreachable etcd
is reported per member, and the profiles part then says it could not be read (exit 75).
"""

from __future__ import annotations

import json
import re
import socket
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import AacTokendError

if TYPE_CHECKING:
    from .fleet import Fleet
    from .fleet_markers import Move

__all__ = ["FleetReport", "MemberRow", "ProfileRow", "fleet_report", "print_status"]

#: A host name as owner keys carry one ([fleet] host, or the machine's, dots allowed).
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
#: An owner value that is no host name is shown escaped, and only this much of it.
_MAX_SHOWN_CHARS = 64


@dataclass(frozen=True)
class MemberRow:
    """One etcd member as this host reaches it (``error`` set: it did not answer)."""

    endpoint: str
    healthy: bool
    leader: bool = False
    version: str = ""
    raft_index: int = 0
    error: str | None = None


@dataclass(frozen=True)
class ProfileRow:
    """One fleet profile: who owns it, how far its chain is, and any attempt out."""

    profile: str
    owner: str | None
    seq: int | None
    unresolved_by: str | None
    error: str | None = None
    #: seconds left on the owner's lease (etcd's count), None: no owner or unknown
    lease_left: int | None = None


@dataclass(frozen=True)
class FleetReport:
    """What ``fleet status`` shows; ``error``: the profiles could not be read."""

    host: str
    fleet: str
    members: tuple[MemberRow, ...]
    profiles: tuple[ProfileRow, ...]
    error: AacTokendError | None = None
    #: ``(profile, move)``: moves on this host that a rerun must finish
    interrupted: tuple[tuple[str, Move], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The report as JSON-ready data (dicts belong at the wire only)."""
        return {
            "host": self.host,
            "fleet": self.fleet,
            "etcd": [asdict(m) for m in self.members],
            "profiles": [asdict(p) for p in self.profiles],
            "error": None if self.error is None else str(self.error),
            "interrupted_moves": [{"profile": p, "move": m.value} for p, m in self.interrupted],
        }


def host_name(configured: str | None = None) -> str:
    """This host's name, as owner keys carry it: [fleet] host, else the machine's."""
    return configured or socket.gethostname()


def shown_host(value: str) -> str:
    """``value`` if it is a host name, else escaped (quoted, ASCII only, cut short): an
    owner key is written by anyone with write access to etcd, and a terminal obeys the
    escape sequences it would otherwise print."""
    if _HOST_RE.fullmatch(value):
        return value
    cut = value[:_MAX_SHOWN_CHARS]
    return ascii(cut) + ("..." if len(value) > len(cut) else "")


def _member(fleet: Fleet, endpoint: str) -> MemberRow:
    try:
        status = fleet.client.status(endpoint)
    except AacTokendError as exc:
        return MemberRow(endpoint, healthy=False, error=str(exc))
    return MemberRow(
        endpoint,
        healthy=True,
        leader=status.is_leader,
        version=status.version,
        raft_index=status.raft_index,
    )


def _owners(fleet: Fleet) -> dict[str, tuple[str, int | None]]:
    """Each owned profile's owner host and the seconds left on its lease."""
    from ..fleet.keys import KeyKind

    found = fleet.client.range(fleet.keys.prefix(KeyKind.OWNER), prefix=True)
    owners = {}
    for kv in found.kvs:
        parsed = fleet.keys.parse(kv.key)
        if parsed is not None:
            info = fleet.client.time_to_live(kv.lease) if kv.lease else None
            host = shown_host(kv.value.decode("utf-8", errors="replace"))
            owners[parsed[1]] = (host, info.ttl if info is not None else None)
    return owners


def fleet_report(fleet: Fleet) -> FleetReport:
    """Ask every member for its status, then read the owner and chain keys."""
    from .fleet_markers import interrupted_moves

    members = tuple(_member(fleet, e) for e in fleet.settings.endpoints)
    host, name = host_name(fleet.settings.host), fleet.settings.name
    moves = tuple(interrupted_moves(fleet.paths.state_dir))
    try:
        owners = _owners(fleet)
        chains, _revision = fleet.chains.read_all()
    except AacTokendError as exc:
        return FleetReport(host, name, members, (), exc, moves)
    names = set(owners) | set(chains) | set(fleet.settings.profiles or ())
    rows = []
    for profile in sorted(names):
        owner, left = owners.get(profile, (None, None))
        found = chains.get(profile)
        if isinstance(found, AacTokendError):
            rows.append(ProfileRow(profile, owner, None, None, str(found), left))
        elif found is None:
            rows.append(ProfileRow(profile, owner, None, None, "no chain in the fleet", left))
        else:
            attempt = found.record.unresolved
            by = shown_host(attempt.host) if attempt is not None else None
            rows.append(ProfileRow(profile, owner, found.record.seq, by, None, left))
    return FleetReport(host, name, members, tuple(rows), None, moves)


def status_text(report: FleetReport) -> str:
    """The report as a person reads it."""
    lines = [f"fleet {report.fleet}, this host: {report.host}"]
    for profile, move in report.interrupted:
        lines.append(
            f"interrupted {move} of profile {profile} on this host: finish it with "
            f"`aac-tokend fleet {move} {profile}`"
        )
    lines.append("etcd:")
    for m in report.members:
        if m.error is not None:
            lines.append(f"  {m.endpoint}  unreachable: {m.error}")
        else:
            role = "leader" if m.leader else "follower"
            lines.append(f"  {m.endpoint}  ok, {role}, etcd {m.version}, index {m.raft_index}")
    if report.error is not None:
        lines.append(f"profiles: cannot be read: {report.error}")
        return "\n".join(lines)
    lines.append("profiles:" if report.profiles else "profiles: none in the fleet")
    for p in report.profiles:
        owner = p.owner or "none"
        if p.owner is not None and p.lease_left is not None:
            owner += f" (lease {p.lease_left} s left)"
        if p.error is not None:
            lines.append(f"  {p.profile}  owner {owner}  {p.error}")
            continue
        pending = (
            f"unresolved attempt by {p.unresolved_by}" if p.unresolved_by else "no attempt out"
        )
        lines.append(f"  {p.profile}  owner {owner}  seq {p.seq}  {pending}")
    return "\n".join(lines)


def print_status(fleet: Fleet, *, json_out: bool) -> int:
    """Print the report; 0, or the error's exit status when the profiles were unreadable."""
    report = fleet_report(fleet)
    if json_out:
        print(json.dumps(report.to_wire(), indent=2))
    else:
        print(status_text(report))
    if report.error is not None:
        print(f"aac-tokend: error: {report.error}", file=sys.stderr)
        return report.error.exit_code
    return 0

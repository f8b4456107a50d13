"""The ``[fleet]`` table of ``config.toml``: etcd endpoints, fleet name, TLS, auth, timings.

Pure: ``parse_fleet`` takes the TOML table, ``check_margins`` the refresh policies; both
raise one-line ``ConfigError``s in ``core.config``'s words (file, dotted key, what is allowed).

Every timing is a setting, so that tests and the demo scale them all down by configuration
(the issue: no code paths of their own), and every minimum the check enforces is derived
from the other settings, never from a production number. The relations, with the defaults:

- W (resolve_wait) >= the courier's whole life: 60 >= 50. A new owner that finds an
  unresolved journal entry waits W before treating it as ambiguous; by then the courier
  that wrote it is dead (its life is bounded by SIGALRM), so its request cannot still leave.
- W >= D + connect + send: 60 >= 10 + 5 + 5. The request leaves within D of the journal
  commit, on a connection opened within the connect timeout, and its bytes stop being
  written after the send timeout; the 40 s left over covers a host's scheduling and the
  rate difference of two hosts' clocks counting W and D.
- courier life >= D + request deadline: 50 >= 10 + 25, so the life limit never cuts a request
  that left in time.
- refresh margin >= lease TTL + W + request deadline + clock skew: 10 + 60 + 25 + 5 = 100.
  An owner dying just before its refresh is noticed after the TTL; its heir may wait W for
  an inherited entry, then refreshes within the request deadline; followers stop serving
  max_clock_skew early. The default policy's 60 s margin is below that: a fleet profile needs
  ``min_margin_seconds`` of at least 100 (the check says so), and an access lifetime long
  enough for it (AAC's are minutes to an hour; ``refresh_fraction`` 0.75 of 10 minutes is
  150 s).

The two residual cases of issue #13 item 7 are rare with these defaults: an owner must be
cut off from etcd for over W = 60 s exactly between the server's answer and its outcome
commit, or a request must linger in the network for over 60 s after it was written.

Over 300 lines because each of the table's sixteen keys has its own check and each timing
relation its own message with its arithmetic; split up, one table's rules would be in two files.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from ..core.policy import PolicySettings
from ..core.state import validate_profile_name
from ..errors import ConfigError, ProfileError

__all__ = ["FleetSettings", "check_margins", "parse_fleet"]

_T = TypeVar("_T")

#: The fleet name prefixes every etcd key and names the high-water file: DNS-label
#: characters only, so it is safe in both and cannot smuggle a '/' or '..' into either.
_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: An etcd cluster has 3, 5 or 7 members; more endpoints than this is a pasted list gone wrong.
MAX_ENDPOINTS = 16
#: Values longer than this are described, not quoted: they may be secrets pasted by mistake.
_MAX_SHOWN_CHARS = 24


@dataclass(frozen=True)
class FleetSettings:
    """The validated ``[fleet]`` table; a missing key means its default here."""

    endpoints: tuple[str, ...]
    name: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password_file: str | None = None
    #: None: every profile is in the fleet; else only these.
    profiles: tuple[str, ...] | None = None
    #: This host's name in the fleet (owner keys, journal entries); None: the machine's
    #: hostname. Set it where hosts share one (containers, or three daemons on one machine).
    host: str | None = None
    #: Asked of etcd, whose granted TTL is what counts. 10 s: an owner's death is noticed
    #: within 10 s, while a GC pause or a slow disk of a few seconds does not cost the lease.
    lease_ttl_seconds: int = 10
    #: D: the request must leave within this of its journal commit. Only one etcd round trip
    #: (the lease check) lies between, milliseconds on a LAN; 10 s spares a loaded host.
    send_window_seconds: float = 10.0
    #: W: see the module docstring; the courier's life (50) with 10 s to spare.
    resolve_wait_seconds: float = 60.0
    #: Followers stop serving this much before expiry (expiry comes from the owner's clock):
    #: NTP keeps hosts within milliseconds, 5 s is a host whose sync is failing.
    max_clock_skew_seconds: float = 5.0
    #: A keepalive every TTL/3: one lost keepalive still leaves time for another.
    keepalive_fraction: float = 1 / 3
    #: The fleet courier's life limit; refresh/courier.py MAX_LIFE_SECONDS.
    courier_life_seconds: float = 50.0
    #: refresh/endpoint.py CONNECT_TIMEOUT_SECONDS.
    connect_timeout_seconds: float = 5.0
    #: A refresh request is under 2 KiB and fits a socket buffer: writing it returns at once
    #: unless the peer's window is shut, and then 5 s bounds how long bytes can linger.
    send_timeout_seconds: float = 5.0
    #: refresh/endpoint.py TOTAL_DEADLINE_SECONDS: the whole request, answer included.
    request_deadline_seconds: float = 25.0

    def covers(self, profile: str) -> bool:
        """True if ``profile`` is in the fleet."""
        return self.profiles is None or profile in self.profiles

    def required_margin_seconds(self) -> float:
        """The least refresh margin that leaves room for a failover (module docstring)."""
        return (
            self.lease_ttl_seconds
            + self.resolve_wait_seconds
            + self.request_deadline_seconds
            + self.max_clock_skew_seconds
        )


@dataclass(frozen=True)
class _Range:
    low: float
    high: float

    def check(self, value: object) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not self.low <= value <= self.high  # NaN fails: rejected
        ):
            raise _BadValueError(
                f"must be a number from {self.low:g} to {self.high:g} (got {_shown(value)})"
            )
        return float(value)


#: Sanity bounds only, wide enough for tests scaled down to fractions of a second; the
#: relations between the timings are checked after (``_check_relations``).
_TIMINGS: Mapping[str, _Range] = {
    "send_window_seconds": _Range(0.05, 300.0),
    "resolve_wait_seconds": _Range(0.1, 3600.0),
    "max_clock_skew_seconds": _Range(0.0, 300.0),
    # at most 1/2: a lease must outlive one lost keepalive; at least 1/10: etcd is not hammered
    "keepalive_fraction": _Range(0.1, 0.5),
    "courier_life_seconds": _Range(0.1, 600.0),
    "connect_timeout_seconds": _Range(0.05, 60.0),
    "send_timeout_seconds": _Range(0.05, 60.0),
    "request_deadline_seconds": _Range(0.1, 300.0),
}
#: etcd leases are whole seconds; etcd grants at least its own minimum (about 2 s).
_LEASE_TTL_MAX = 3600
_PATH_KEYS = ("ca_file", "cert_file", "key_file", "password_file")
KNOWN_KEYS = (
    "endpoints",
    "name",
    *_PATH_KEYS,
    "user",
    "profiles",
    "host",
    "lease_ttl_seconds",
    *_TIMINGS,
)


class _BadValueError(Exception):
    """A bad value under one key; the caller adds the file and the key."""


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= _MAX_SHOWN_CHARS else f"a {len(text)}-digit number"
    if isinstance(value, str):
        return repr(value) if len(value) <= _MAX_SHOWN_CHARS else f"a {len(value)}-char string"
    if isinstance(value, list):
        return "an array"
    return "a table" if isinstance(value, dict) else f"a {type(value).__name__}"


def _error(source: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"config error in {source}: key {key[:80]!r} {problem}")


def _endpoint(value: object) -> str:
    need = "must be etcd client URLs like 'https://etcd1:2379'"
    if not isinstance(value, str) or not value or len(value) > 2048:
        raise _BadValueError(f"{need} (got {_shown(value)})")
    # As the token endpoint's check (core/origin.py): urlsplit keeps a space or a control
    # character in the host, which the resolver and the TLS check would each read their way.
    if "\\" in value or not value.isprintable() or any(c.isspace() for c in value):
        raise _BadValueError(
            f"{need}; this one holds a backslash, whitespace or a control character "
            f"(got {_shown(value)})"
        )
    try:
        url = urllib.parse.urlsplit(value)
        port = url.port
    except ValueError:
        raise _BadValueError(f"{need} (got {_shown(value)})") from None
    if url.username is not None or url.password is not None:
        raise _BadValueError("must not carry credentials; use fleet.user and password_file")
    host = url.hostname or ""
    if url.scheme not in ("https", "http") or not host or port is None:
        raise _BadValueError(f"{need}, with scheme, host and port (got {_shown(value)})")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise _BadValueError(f"{need}, without a path or query (got {_shown(value)})")
    if url.scheme == "http" and not _loopback(host):
        raise _BadValueError(
            f"uses http to {host[:40]!r}: etcd would see the fleet's traffic in clear; use "
            "https (http is for loopback only)"
        )
    return value


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _endpoints(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_ENDPOINTS:
        raise _BadValueError(
            f"must be an array of 1 to {MAX_ENDPOINTS} etcd client URLs (got {_shown(value)})"
        )
    urls = tuple(_endpoint(each) for each in value)
    if len(set(urls)) != len(urls):
        raise _BadValueError("lists an endpoint twice")
    return urls


def _name(value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise _BadValueError(
            "must be 1-63 lowercase letters, digits or '-', starting and ending with a letter "
            f"or digit (got {_shown(value)})"
        )
    return value


def _path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _BadValueError(f"must be an absolute file path (got {_shown(value)})")
    return value


def _user(value: object) -> str:
    if not isinstance(value, str) or not value or not value.isprintable() or len(value) > 128:
        raise _BadValueError(f"must be an etcd user name (got {_shown(value)})")
    return value


def _profiles(value: object) -> tuple[str, ...] | None:
    if value == "all":
        return None
    need = 'must be "all" or an array of profile names'
    if not isinstance(value, list) or not value:
        raise _BadValueError(f"{need} (got {_shown(value)})")
    for each in value:
        if not isinstance(each, str):
            raise _BadValueError(f"{need} (got {_shown(each)} in it)")
        try:
            validate_profile_name(each)
        except ProfileError as exc:
            raise _BadValueError(f"names an unusable profile: {exc}") from None
    if len(set(value)) != len(value):
        raise _BadValueError("names a profile twice")
    return tuple(value)


def _host(value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value.lower()):
        raise _BadValueError(f"must be a host name of letters, digits or '-' (got {_shown(value)})")
    return value


def _lease_ttl(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _LEASE_TTL_MAX:
        raise _BadValueError(
            f"must be a whole number of seconds from 1 to {_LEASE_TTL_MAX} (got {_shown(value)})"
        )
    return value


def parse_fleet(value: object, source: str) -> FleetSettings:
    """The validated ``[fleet]`` table; ``source`` names the file in errors."""
    if not isinstance(value, dict):
        raise _error(source, "fleet", f"must be a table (got {_shown(value)})")
    table: dict[str, object] = value

    def checked(key: str, check: Callable[[object], _T]) -> _T:
        try:
            return check(table[key])
        except _BadValueError as problem:
            raise _error(source, f"fleet.{key}", str(problem)) from None

    if "password" in table:  # before the unknown-key check: this mistake has its own advice
        raise _error(
            source,
            "fleet.password",
            "is refused: a password is never written in config.toml; put it in a file of its "
            "own (mode 0600) and name that file with fleet.password_file",
        )
    for key in table:
        if key not in KNOWN_KEYS:
            near = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            problem = f"is not known; {hint}known keys: {', '.join(KNOWN_KEYS)}"
            raise _error(source, f"fleet.{key}", problem)
    for required in ("endpoints", "name"):
        if required not in table:
            raise _error(source, f"fleet.{required}", "is missing; fleet mode needs it")
    found: dict[str, object] = {
        "endpoints": checked("endpoints", _endpoints),
        "name": checked("name", _name),
    }
    checks: dict[str, Callable[[object], object]] = {
        **dict.fromkeys(_PATH_KEYS, _path),
        "user": _user,
        "profiles": _profiles,
        "host": _host,
        "lease_ttl_seconds": _lease_ttl,
        **{key: allowed.check for key, allowed in _TIMINGS.items()},
    }
    found.update({key: checked(key, check) for key, check in checks.items() if key in table})
    settings = FleetSettings(**found)  # type: ignore[arg-type]
    _check_pairs(settings, source)
    _check_relations(settings, source)
    return settings


def _check_pairs(s: FleetSettings, source: str) -> None:
    for one, other in (("cert_file", "key_file"), ("user", "password_file")):
        if (getattr(s, one) is None) != (getattr(s, other) is None):
            given, missing = (one, other) if getattr(s, one) is not None else (other, one)
            raise _error(
                source, f"fleet.{given}", f"needs fleet.{missing} too; set both or neither"
            )
    tls = [key for key in ("ca_file", "cert_file") if getattr(s, key) is not None]
    if tls and not any(url.startswith("https:") for url in s.endpoints):
        raise _error(source, f"fleet.{tls[0]}", "is for https endpoints, and all are http")


def _check_relations(s: FleetSettings, source: str) -> None:
    """The timing relations of the module docstring, each with its numbers and its fix."""
    wait, window = s.resolve_wait_seconds, s.send_window_seconds
    sent_by = window + s.connect_timeout_seconds + s.send_timeout_seconds
    if wait < s.courier_life_seconds:
        raise _error(
            source,
            "fleet.resolve_wait_seconds",
            f"({wait:g}) must be at least courier_life_seconds ({s.courier_life_seconds:g}): "
            "an heir must not act on a journal entry whose courier may still send; raise it",
        )
    if wait < sent_by:
        raise _error(
            source,
            "fleet.resolve_wait_seconds",
            f"({wait:g}) must be at least send_window_seconds + connect_timeout_seconds + "
            f"send_timeout_seconds = {window:g} + {s.connect_timeout_seconds:g} + "
            f"{s.send_timeout_seconds:g} = {sent_by:g}; raise it or lower those",
        )
    life_needs = window + s.request_deadline_seconds
    if s.courier_life_seconds < life_needs:
        raise _error(
            source,
            "fleet.courier_life_seconds",
            f"({s.courier_life_seconds:g}) must be at least send_window_seconds + "
            f"request_deadline_seconds = {window:g} + {s.request_deadline_seconds:g} = "
            f"{life_needs:g}, or a request sent in time is cut short; raise it",
        )


def check_margins(
    fleet: FleetSettings,
    policy: PolicySettings,
    profile_policies: Mapping[str, PolicySettings],
    source: str,
) -> None:
    """Refuse a refresh margin of a fleet profile that leaves no room for a failover.

    ``policy`` is the top level's (every profile without a table of its own uses it);
    ``profile_policies`` are the ``[profiles.NAME]`` tables.
    """
    need = fleet.required_margin_seconds()
    names = fleet.profiles if fleet.profiles is not None else tuple(profile_policies)
    where = [(f"profiles.{n}.", profile_policies[n]) for n in names if n in profile_policies]
    if fleet.profiles is None or any(n not in profile_policies for n in names):
        where.insert(0, ("", policy))
    for at, each in where:
        if each.min_margin_seconds < need:
            raise _error(
                source,
                f"{at}min_margin_seconds",
                f"({each.min_margin_seconds:g}) leaves no room for a fleet failover: it must be "
                "at least fleet.lease_ttl_seconds + resolve_wait_seconds + "
                "request_deadline_seconds + max_clock_skew_seconds = "
                f"{fleet.lease_ttl_seconds:g} + {fleet.resolve_wait_seconds:g} + "
                f"{fleet.request_deadline_seconds:g} + {fleet.max_clock_skew_seconds:g} = "
                f"{need:g}; raise it or lower those",
            )


def fleet_from_table(
    value: object, source: str, policy: PolicySettings, profiles: Mapping[str, PolicySettings]
) -> FleetSettings:
    """The ``[fleet]`` table of config.toml, parsed and checked against the refresh margins
    of every profile it covers (what ``core.config`` calls, and only for a ``[fleet]``)."""
    fleet = parse_fleet(value, source)
    check_margins(fleet, policy, profiles, source)
    return fleet

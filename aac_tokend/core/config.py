"""The daemon's settings: ``config.toml`` in the config directory, validated strictly.

``parse_config`` is pure (text in, ``Config`` out); ``host.configfile.load_config`` is the
edge that reads the file. Every problem is one ``ConfigError`` line naming the file, the
dotted key and what is allowed, so a typo never silently falls back to a default.

Longer than 300 lines: the keys, their ranges and the one checker that reads them are one
table; split, each half would have to be read beside the other.
"""

from __future__ import annotations

import difflib
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigError, ProfileError
from .policy import PolicySettings
from .state import validate_profile_name

if TYPE_CHECKING:
    from ..fleet.settings import FleetSettings

__all__ = [
    "CONFIG_FILENAME",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "Config",
    "parse_config",
]

CONFIG_FILENAME = "config.toml"
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")

#: A config file is a few hundred bytes; refusing anything larger keeps a wrong path (a log,
#: a disk image) from being read into memory whole.
MAX_CONFIG_BYTES = 1 << 20

#: Values longer than this are described, not quoted, in errors: a long string pasted into
#: the wrong key may be a secret, and error lines end up in logs.
_MAX_SHOWN_CHARS = 24

#: Keys are user text too (a TOML key may be any string); errors quote at most this much.
_MAX_KEY_CHARS = 80

_T = TypeVar("_T")


@dataclass(frozen=True)
class _Range:
    """A number key's bounds; ``low_open`` makes the lower bound exclusive."""

    low: float
    high: float
    low_open: bool = False

    def admits(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high  # NaN fails both: rejected

    def describe(self) -> str:
        if self.low_open:
            return f"a number greater than {self.low:g} and at most {self.high:g}"
        return f"a number from {self.low:g} to {self.high:g}"


#: Policy keys allowed at the top level and in ``[profiles.NAME]``, with their bounds. The
#: bounds keep a typo from disabling refresh: a fraction near 1 would refresh at expiry, a
#: zero backoff would hammer the endpoint, and AAC refresh tokens live 1 to 365 days.
POLICY_RANGES: Mapping[str, _Range] = MappingProxyType(
    {
        "refresh_fraction": _Range(0.1, 0.95),
        "min_margin_seconds": _Range(0.0, 3600.0),
        "backoff_first_seconds": _Range(0.1, 60.0),
        "backoff_cap_seconds": _Range(1.0, 3600.0),
        "refresh_lifetime_days": _Range(1.0, 365.0),
    }
)

#: A hook that needs more than 5 minutes is stuck; one that needs less than 1 s cannot
#: even start a notifier reliably.
_ALERT_TIMEOUT_RANGE = _Range(1.0, 300.0)

_OTHER_KEYS = (
    "on_alert",
    "alert_timeout_seconds",
    "notifications",
    "log_format",
    "log_level",
    "profiles",
    "fleet",
)
_TOP_KEYS = (*POLICY_RANGES, *_OTHER_KEYS)


def _no_profiles() -> Mapping[str, PolicySettings]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Config:
    """Validated settings; every field has the default that a missing key means."""

    policy: PolicySettings = field(default_factory=PolicySettings)
    profile_policies: Mapping[str, PolicySettings] = field(default_factory=_no_profiles)
    on_alert: tuple[str, ...] | None = None  # argv of the alert hook, never run by a shell
    alert_timeout_seconds: float = 10.0
    notifications: bool = True
    log_format: str = "auto"
    log_level: str = "info"
    fleet: FleetSettings | None = None  # the [fleet] table; None: single host, no etcd

    def policy_for(self, profile: str) -> PolicySettings:
        """The policy of ``profile``: its ``[profiles.NAME]`` overrides, else the top level."""
        return self.profile_policies.get(profile, self.policy)


class _BadValueError(Exception):
    """A bad value under one key; ``_Checker`` adds the file and the key."""


def _shown(value: object) -> str:
    """A value as an error may quote it: short scalars verbatim, the rest described."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= _MAX_SHOWN_CHARS else f"a {len(text)}-digit number"
    if isinstance(value, str):
        if len(value) <= _MAX_SHOWN_CHARS:
            return repr(value)
        return f"a string of {len(value)} characters"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # TOML dates and times


def _number(value: object, allowed: _Range) -> float:
    # bool is an int subclass; ``true`` for a number is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, int | float) or not allowed.admits(value):
        raise _BadValueError(f"must be {allowed.describe()} (got {_shown(value)})")
    return float(value)


def _in(allowed: _Range) -> Callable[[object], float]:
    def check(value: object) -> float:
        return _number(value, allowed)

    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _BadValueError(f"must be true or false (got {_shown(value)})")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _BadValueError(f"must be one of {', '.join(choices)} (got {_shown(value)})")
        return value

    return check


def _argv(value: object) -> tuple[str, ...]:
    """A command as argv: an array of strings, or one string split like a shell would."""
    need = "must be a command: an array of strings or one string"
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:  # an unclosed quote
            raise _BadValueError(f"{need} with balanced quotes ({exc})") from None
    elif isinstance(value, list) and all(isinstance(arg, str) for arg in value):
        argv = list(value)
    else:
        raise _BadValueError(f"{need} (got {_shown(value)})")
    if not argv or not argv[0]:
        raise _BadValueError(f"{need}, not empty; remove the key to run no command")
    if any("\0" in arg for arg in argv):
        raise _BadValueError(f"{need}, without NUL characters")
    return tuple(argv)


@dataclass(frozen=True)
class _Checker:
    """Turns a problem under a key into the one-line ConfigError for this file."""

    source: str

    def error(self, key: str, problem: str) -> ConfigError:
        if len(key) > _MAX_KEY_CHARS:
            key = key[: _MAX_KEY_CHARS - 3] + "..."
        return ConfigError(f"config error in {self.source}: key {key!r} {problem}")

    def table(self, value: object, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table (got {_shown(value)})")
        return value

    def unknown_keys(self, table: Mapping[str, object], known: tuple[str, ...], at: str) -> None:
        for key in table:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise self.error(at + key, f"is not known; {hint}known keys: {', '.join(known)}")

    def value(
        self,
        table: Mapping[str, object],
        key: str,
        at: str,
        check: Callable[[object], _T],
        default: _T,
    ) -> _T:
        if key not in table:
            return default
        try:
            return check(table[key])
        except _BadValueError as problem:
            raise self.error(at + key, str(problem)) from None

    def policy(self, table: Mapping[str, object], base: PolicySettings, at: str) -> PolicySettings:
        """``base`` with the policy keys of ``table`` applied; the keys were checked known."""
        changes: dict[str, float] = {}
        for key, allowed in POLICY_RANGES.items():
            if key in table:
                changes[key] = self.value(table, key, at, _in(allowed), 0.0)
        merged = replace(base, **changes)
        first, cap = merged.backoff_first_seconds, merged.backoff_cap_seconds
        if cap < first:
            # blame the key this table set; a profile may clash with a top-level value
            if "backoff_cap_seconds" in table or "backoff_first_seconds" not in table:
                problem = f"must be at least backoff_first_seconds ({first:g}) (got {cap:g})"
                raise self.error(at + "backoff_cap_seconds", problem)
            problem = f"must be at most backoff_cap_seconds ({cap:g}) (got {first:g})"
            raise self.error(at + "backoff_first_seconds", problem)
        return merged


def _profiles(check: _Checker, value: object, base: PolicySettings) -> Mapping[str, PolicySettings]:
    profiles: dict[str, PolicySettings] = {}
    for name, overrides in check.table(value, "profiles").items():
        at = f"profiles.{name}"
        try:
            validate_profile_name(name)
        except ProfileError as exc:
            raise check.error(at, f"names an unusable profile: {exc}") from None
        table = check.table(overrides, at)
        check.unknown_keys(table, tuple(POLICY_RANGES), at + ".")
        profiles[name] = check.policy(table, base, at + ".")
    return MappingProxyType(profiles)


def _fleet(
    value: object, source: str, policy: PolicySettings, profiles: Mapping[str, PolicySettings]
) -> FleetSettings:
    from ..fleet.settings import fleet_from_table  # only for a [fleet] table: see fleet/

    return fleet_from_table(value, source, policy, profiles)


def parse_config(text: str, source: str = CONFIG_FILENAME) -> Config:
    """Parse and validate config text; ``source`` names the file in error messages."""
    check = _Checker(source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message carries the line and column: "... (at line 3, column 7)"
        one_line = " ".join(str(exc).split())
        raise ConfigError(f"config error in {source}: not valid TOML: {one_line}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError(
            f"config error in {source}: not valid TOML: arrays or tables nested too deeply"
        ) from None
    except ValueError as exc:
        # tomllib lets int() and float() errors through as plain ValueError: an integer of
        # more than 4300 digits (Python's int-to-str limit) is the one we know of. Python's own
        # text would tell the reader to change an interpreter setting: say what to fix instead.
        what = "a number has too many digits" if "digits" in str(exc) else "a value is unreadable"
        raise ConfigError(
            f"config error in {source}: not valid TOML: {what}; give every number a sensible size"
        ) from None
    check.unknown_keys(doc, _TOP_KEYS, "")
    policy = check.policy(doc, PolicySettings(), "")
    defaults = Config()
    profiles = _profiles(check, doc["profiles"], policy) if "profiles" in doc else _no_profiles()
    return Config(
        policy=policy,
        profile_policies=profiles,
        on_alert=check.value(doc, "on_alert", "", _argv, None),
        alert_timeout_seconds=check.value(
            doc,
            "alert_timeout_seconds",
            "",
            _in(_ALERT_TIMEOUT_RANGE),
            defaults.alert_timeout_seconds,
        ),
        notifications=check.value(doc, "notifications", "", _boolean, defaults.notifications),
        log_format=check.value(doc, "log_format", "", _choice(LOG_FORMATS), defaults.log_format),
        log_level=check.value(doc, "log_level", "", _choice(LOG_LEVELS), defaults.log_level),
        fleet=_fleet(doc["fleet"], source, policy, profiles) if "fleet" in doc else None,
    )

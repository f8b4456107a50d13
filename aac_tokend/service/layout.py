"""What a service install depends on, read from this machine: the Layout.

The platform, the user, the program that runs aac-tokend, its directories, and the proxy
and CA variables the daemon will need (a service manager passes none of them on).
``detect_layout`` reads them; ``render`` turns a Layout into files.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aac_tokend.errors import InputError
from aac_tokend.host.paths import APP_NAME, HOME_ENV, Paths, resolve_paths

__all__ = [
    "LABEL",
    "NETWORK_ENV",
    "SERVICE_UNIT",
    "SOCKET_UNIT",
    "Layout",
    "detect_layout",
    "find_program",
    "host_platform",
    "mask_credentials",
    "network_environment",
]

LABEL = "io.aac-tokend.agent"
SERVICE_UNIT = "aac-tokend.service"
SOCKET_UNIT = "aac-tokend.socket"

#: How the daemon reaches the token endpoint: requests reads the proxy variables (either case;
#: the lower-case one wins when both are set) and REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE;
#: SSL_CERT_FILE and SSL_CERT_DIR are recorded too, for what else the program may load. A
#: service manager passes none of them on, so a daemon that works in the shell would fail
#: behind a corporate proxy or TLS inspection as a service.
_PROXY_NAMES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
NETWORK_ENV = (
    *_PROXY_NAMES,
    "NO_PROXY",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
#: The proxy variables: a value with an "@" carries a user name (and likely a password).
_PROXY_ENV = frozenset(_PROXY_NAMES)

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # RFC 3986 scheme, then "://"


@dataclass(frozen=True)
class Layout:
    """What the rendered files depend on: the platform, the user, the program, the dirs."""

    platform: str  # "linux" or "macos"
    home: Path
    uid: int
    program: tuple[str, ...]  # absolute argv prefix that runs aac-tokend
    paths: Paths
    environment: tuple[tuple[str, str], ...] = ()  # what the daemon needs to agree with us
    # Proxy and CA variables of the installing shell, credentials and all; see NETWORK_ENV.
    network: tuple[tuple[str, str], ...] = ()
    runtime_base: Path | None = None  # the user manager's %t ($XDG_RUNTIME_DIR), Linux only
    lingering: bool | None = None  # loginctl enable-linger is on (Linux); None: unknown
    # What PrivateTmp=yes makes private to the service: none of our dirs may be under them
    # (the daemon would not see them, and tmp cleaners would delete the state).
    private_tmp: tuple[Path, ...] = (Path("/tmp"), Path("/var/tmp"))  # noqa: S108

    @property
    def unit_dir(self) -> Path:
        return self.home / ".config" / "systemd" / "user"

    @property
    def plist_path(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"

    @property
    def env_file(self) -> Path:
        """Where a proxy URL with credentials goes on Linux (0600, EnvironmentFile=)."""
        return self.paths.config_dir / "service.env"

    @property
    def secret_network(self) -> tuple[tuple[str, str], ...]:
        """The network variables that carry credentials (a proxy URL with user@)."""
        return tuple((n, v) for n, v in self.network if n in _PROXY_ENV and "@" in v)

    @property
    def plain_network(self) -> tuple[tuple[str, str], ...]:
        """The network variables that hold no secret."""
        secret = self.secret_network
        return tuple(pair for pair in self.network if pair not in secret)

    def masked(self) -> Layout:
        """This layout with the credentials in its network variables masked, for printing."""
        secret = self.secret_network
        network = tuple(
            (n, mask_credentials(v) if (n, v) in secret else v) for n, v in self.network
        )
        return dataclasses.replace(self, network=network)

    @property
    def log_file(self) -> Path:
        return self.home / "Library" / "Logs" / APP_NAME / f"{APP_NAME}.log"


def host_platform() -> str | None:
    """The platform we run on, "linux" or "macos"; None for anything else."""
    if sys.platform == "darwin":
        return "macos"
    return "linux" if sys.platform.startswith("linux") else None


def find_program(env: Mapping[str, str]) -> tuple[str, ...]:
    """The argv prefix that runs this installation's aac-tokend, with absolute paths.

    The console script next to our interpreter comes first (it belongs to this install even
    when it is not on PATH); symlinks are kept, not resolved, so that a Homebrew or pipx
    upgrade that moves the target does not break the unit.
    """
    beside = Path(sys.executable).parent / APP_NAME
    if beside.is_file() and os.access(beside, os.X_OK):
        return (os.path.abspath(beside),)
    found = shutil.which(APP_NAME, path=env.get("PATH"))
    if found:
        return (os.path.abspath(found),)
    return (os.path.abspath(sys.executable), "-m", "aac_tokend")


def network_environment(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The proxy and CA variables set (non-empty) in ``env``, in NETWORK_ENV's order."""
    found = tuple((name, env[name]) for name in NETWORK_ENV if env.get(name))
    for name, value in found:
        if any(ch in value for ch in "\n\r\0"):
            raise InputError(
                f"{name} holds a line break, which no service file can carry; "
                f"set {name} to a single-line value and run service install again"
            )
    return found


def mask_credentials(value: str) -> str:
    """A proxy URL with its password (or a lone user name) replaced by ``***``, for printing."""
    userinfo, at, host = value.rpartition("@")  # the last "@": a raw "@" in a password
    if not at:
        return value
    scheme = _SCHEME.match(userinfo)  # "://" may occur in a password too: only a real scheme
    prefix = scheme[0] if scheme else ""
    user, colon, _password = userinfo[len(prefix) :].partition(":")
    return f"{prefix}{user}:***@{host}" if colon else f"{prefix}***@{host}"


def _foreign_paths(platform: str, home: Path, uid: int) -> Paths:
    """platformdirs' defaults on the other platform, for a dry run there.

    Our own environment (XDG_*) says nothing about that machine, so it is not consulted.
    """
    if platform == "macos":
        support = home / "Library" / "Application Support" / APP_NAME
        return Paths(support, support, home / "Library" / "Caches" / "TemporaryItems" / APP_NAME)
    share = home / ".local" / "share" / APP_NAME
    return Paths(home / ".config" / APP_NAME, share, Path(f"/run/user/{uid}") / APP_NAME)


def detect_layout(platform: str, env: Mapping[str, str] = os.environ) -> Layout:
    """The Layout of this user on this machine, rendering for ``platform``."""
    uid = os.getuid()
    user = pwd.getpwuid(uid)
    home = Path(env.get("HOME") or user.pw_dir)
    foreign = platform != host_platform()
    if foreign and not env.get(HOME_ENV):
        paths = _foreign_paths(platform, home, uid)
    else:
        paths = resolve_paths(env)
    environment: list[tuple[str, str]] = []
    if env.get(HOME_ENV):
        environment.append((HOME_ENV, str(paths.config_dir.parent)))
    elif not foreign:
        # platformdirs reads these (absolute values only); the manager's environment may
        # lack them, so the daemon would look elsewhere than this shell.
        names = ["XDG_CONFIG_HOME", "XDG_DATA_HOME"]
        names += ["XDG_RUNTIME_DIR"] if platform == "macos" else []
        environment += [(n, env[n]) for n in names if env.get(n, "").startswith("/")]
    runtime_base = lingering = None
    if platform == "linux":
        xdg = "" if foreign else env.get("XDG_RUNTIME_DIR", "")
        runtime_base = Path(xdg) if xdg.startswith("/") else Path(f"/run/user/{uid}")
        lingering = (Path("/var/lib/systemd/linger") / user.pw_name).exists()
    return Layout(
        platform=platform,
        home=home,
        uid=uid,
        program=find_program(env),
        paths=paths,
        environment=tuple(environment),
        # Recorded for the other platform too: a dry run there shows what would be carried.
        network=network_environment(env),
        runtime_base=runtime_base,
        lingering=lingering,
    )

"""The files that run aac-tokend under systemd or launchd, rendered from package data.

The unit files (``systemd/``) and the LaunchAgent (``launchd/``) ship with ``@NAME@``
placeholders. A Layout says what they depend on (platform, user, program, directories);
detect_layout reads it from this machine, and rendering it is pure (a Layout in, text out).
"""

from __future__ import annotations

import dataclasses
import os
import plistlib
import pwd
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

from aac_tokend.errors import InputError
from aac_tokend.host.paths import APP_NAME, HOME_ENV, Paths, resolve_paths

__all__ = [
    "LABEL",
    "NETWORK_ENV",
    "SERVICE_UNIT",
    "SOCKET_UNIT",
    "Layout",
    "check_socket_room",
    "detect_layout",
    "find_program",
    "host_platform",
    "mask_credentials",
    "network_environment",
    "read_template",
    "render_env_file",
    "render_launchd",
    "render_systemd",
]

LABEL = "io.aac-tokend.agent"
SERVICE_UNIT = "aac-tokend.service"
SOCKET_UNIT = "aac-tokend.socket"

# Usable bytes of sockaddr_un.sun_path (its size minus the NUL) on the target platform; the
# host's value is in unixsock, but a dry run for the other platform needs that one's.
_SOCKET_PATH_MAX = {"linux": 107, "macos": 103}

# The only PATH launchd gives an agent.
_LAUNCHD_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"

# Where `[tool.setuptools.package-dir]` maps the top-level template directories.
_TEMPLATE_PACKAGES = {
    "systemd": "aac_tokend._units_systemd",
    "launchd": "aac_tokend._units_launchd",
}

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
_PLACEHOLDER = re.compile(r"@([A-Z][A-Z_]*)@")
_BLOCK_PLACEHOLDER = re.compile(r"^@([A-Z][A-Z_]*)@\n", re.MULTILINE)


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


def read_template(kind: str, name: str) -> str:
    """A template from the package data, or from the source checkout next to the package."""
    try:
        return resources.files(_TEMPLATE_PACKAGES[kind]).joinpath(name).read_text("utf-8")
    except (ModuleNotFoundError, OSError):
        pass  # an editable install does not map the package-dir entries
    try:
        return (Path(__file__).resolve().parents[2] / kind / name).read_text("utf-8")
    except OSError as exc:
        raise InputError(
            f"the template {kind}/{name} is missing from this aac-tokend; reinstall aac-tokend"
        ) from exc


def _fill(template: str, values: Mapping[str, str], blocks: Mapping[str, list[str]]) -> str:
    # A block placeholder stands alone on its line and becomes zero or more lines.
    text = _BLOCK_PLACEHOLDER.sub(lambda m: "".join(f"{line}\n" for line in blocks[m[1]]), template)
    return _PLACEHOLDER.sub(lambda m: values[m[1]], text)


def _unit_word(word: str, *, exec_argument: bool = False) -> str:
    """``word`` as one word of a unit-file setting (systemd.syntax(7) quoting)."""
    if exec_argument:
        word = word.replace("$", "$$")  # Exec lines expand $VAR in arguments, not in the path
    if re.search(r"[\s\"'\\;]", word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def _unit_path(path: Path, layout: Layout) -> str:
    """``path`` with the %t or %h specifier where it applies, other % escaped."""
    for base, spec in ((layout.runtime_base, "%t"), (layout.home, "%h")):
        if base is not None and path.is_relative_to(base):
            rest = str(path.relative_to(base)).replace("%", "%%")
            return spec if rest == "." else f"{spec}/{rest}"
    return str(path).replace("%", "%%")


def check_socket_room(layout: Layout) -> str:
    """Refuse a control socket path over the platform's limit; say what room profiles have."""
    limit = _SOCKET_PATH_MAX[layout.platform]
    control = layout.paths.control_socket
    if len(os.fsencode(control)) > limit:
        raise InputError(
            f"control socket path {control} is {len(os.fsencode(control))} bytes, over the "
            f"{limit}-byte limit of Unix sockets; install with AAC_TOKEND_HOME set to a "
            "shorter directory, e.g. AAC_TOKEND_HOME=~/.aac-tokend"
        )
    room = limit - len(os.fsencode(layout.paths.token_socket("")))
    return f"note: token socket paths leave room for profile names of up to {room} bytes"


def render_systemd(layout: Layout) -> dict[str, str]:
    """The socket and service unit for ``layout``, by file name."""
    dirs = (layout.paths.config_dir, layout.paths.state_dir, layout.paths.runtime_dir)
    for path in dirs:
        for tmp in layout.private_tmp:
            if path.is_relative_to(tmp):
                raise InputError(
                    f"{path} is under {tmp}, which the service replaces with a private one "
                    "(PrivateTmp=yes); set AAC_TOKEND_HOME to a directory elsewhere"
                )
    values = {
        "PROGRAM": " ".join(
            _unit_word(w.replace("%", "%%"), exec_argument=i > 0)
            for i, w in enumerate(layout.program)
        ),
        "CONTROL_SOCKET": _unit_path(layout.paths.control_socket, layout),
        "READ_WRITE_PATHS": " ".join(_unit_word("-" + _unit_path(p, layout)) for p in dirs),
    }
    environment = [
        "Environment=" + _unit_word(f"{name}={value}".replace("%", "%%"))
        for name, value in (*layout.environment, *layout.plain_network)
    ]
    if layout.secret_network:
        # No "-": without the file the daemon would not get past the proxy; better that the
        # unit fails at once and says which file is missing.
        environment.append("EnvironmentFile=" + _unit_word(_unit_path(layout.env_file, layout)))
    return {
        name: _fill(read_template("systemd", name), values, {"ENVIRONMENT": environment})
        for name in (SOCKET_UNIT, SERVICE_UNIT)
    }


def render_env_file(layout: Layout) -> str:
    """The EnvironmentFile for the variables that carry credentials (systemd.exec(5))."""
    lines = ["# Written by `aac-tokend service install`: proxy settings with credentials (0600)."]
    for name, value in layout.secret_network:
        # Double quotes: systemd takes the value literally, bar these backslash escapes.
        quoted = re.sub(r'([\\"$`])', r"\\\1", value)
        lines.append(f'{name}="{quoted}"')
    return "".join(f"{line}\n" for line in lines)


def render_launchd(layout: Layout) -> str:
    """The LaunchAgent plist for ``layout``."""
    indent = " " * 8
    program_dir = os.path.dirname(layout.program[0])
    environment = [
        ("PATH", f"{program_dir}:{_LAUNCHD_PATH}"),
        *layout.environment,
        *layout.network,
    ]
    blocks = {
        "PROGRAM_ARGUMENTS": [f"{indent}<string>{xml_escape(w)}</string>" for w in layout.program],
        "ENVIRONMENT": [
            f"{indent}<key>{xml_escape(k)}</key>\n{indent}<string>{xml_escape(v)}</string>"
            for k, v in environment
        ],
    }
    text = _fill(
        read_template("launchd", f"{LABEL}.plist"),
        {"LOG_FILE": xml_escape(str(layout.log_file))},
        blocks,
    )
    plistlib.loads(text.encode("utf-8"))  # a template that renders to a broken plist is a bug
    return text

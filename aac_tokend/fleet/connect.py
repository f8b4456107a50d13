"""From ``FleetSettings`` to an etcd client: one way, for the daemon, its courier and the commands.

Three copies of this once read the same settings three ways: the daemon and its courier built
TLS only when ``ca_file`` was set (a client certificate without it was never presented), and
read ``password_file`` unguarded with ``.strip()`` while the commands stripped CR/LF only.
Here the password file is read once per process, checked, with one trailing newline off
(what ``echo`` and editors add; any other whitespace is part of the password, as etcd allows).

``check_files`` is what loading ``config.toml`` runs on a ``[fleet]`` table: each file it
names is a readable regular file, so a wrong path is one line at start, not a traceback or a
silent etcd later.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..store.fileio import read_regular_file
from .etcd_session import Credentials, TlsFiles

if TYPE_CHECKING:  # built on demand: the client pulls in requests
    from .etcd import EtcdClient
    from .settings import FleetSettings

__all__ = [
    "MAX_PASSWORD_BYTES",
    "check_files",
    "connect",
    "credentials",
    "read_password",
    "tls_files",
]

#: An etcd password is short; a larger file is the wrong file (and is not read whole).
MAX_PASSWORD_BYTES = 4096
#: The settings that name files, in the order a config error names them.
_FILE_KEYS = ("ca_file", "cert_file", "key_file", "password_file")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_files(settings: FleetSettings, source: str) -> None:
    """ConfigError (one line, naming the key) unless each file named is a readable regular
    file; nothing is kept of what is read."""
    for key in _FILE_KEYS:
        path = getattr(settings, key)
        if path is None:
            continue
        try:
            read_regular_file(Path(path), 0)
        except OSError as exc:
            raise ConfigError(
                f"config error in {source}: key 'fleet.{key}' names {path!r}, which cannot be "
                f"read ({_reason(exc)}); fix the path or its permissions"
            ) from None


def read_password(path: str) -> str:
    """The password in ``path``: UTF-8, one trailing newline (LF or CRLF) removed, else as
    written; ConfigError if the file cannot be read."""
    try:
        data, _ = read_regular_file(Path(path), MAX_PASSWORD_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"fleet.password_file {path!r}: cannot read it ({_reason(exc)}); fix the path or "
            "its permissions"
        ) from None
    if len(data) > MAX_PASSWORD_BYTES:
        raise ConfigError(f"fleet.password_file {path!r}: over {MAX_PASSWORD_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"fleet.password_file {path!r}: not UTF-8 text (bad byte at offset {exc.start}); "
            "etcd passwords are text"
        ) from None
    return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text


def tls_files(settings: FleetSettings) -> TlsFiles | None:
    """The CA and client certificate to use, or None for plain https trust (and http)."""
    if settings.ca_file is None and settings.cert_file is None:
        return None
    return TlsFiles(settings.ca_file, settings.cert_file, settings.key_file)


def credentials(settings: FleetSettings, password: str | None = None) -> Credentials | None:
    """The etcd user and its password (``password`` if given, else read from the file)."""
    if settings.user is None or settings.password_file is None:
        return None
    if password is None:
        password = read_password(settings.password_file)
    return Credentials(settings.user, password)


def connect(
    settings: FleetSettings,
    *,
    password: str | None = None,
    timeout: float | None = None,
    connect_timeout: float | None = None,
) -> EtcdClient:
    """An etcd client of the fleet's members with its TLS files and user; ``password`` is the
    one read already (the courier's comes on its stdin), ``None`` reads the file. Unset
    timeouts are the client's defaults."""
    from .etcd import DEFAULT_CONNECT_TIMEOUT_SECONDS, DEFAULT_TIMEOUT_SECONDS, EtcdClient

    return EtcdClient(
        settings.endpoints,
        timeout=DEFAULT_TIMEOUT_SECONDS if timeout is None else timeout,
        connect_timeout=(
            DEFAULT_CONNECT_TIMEOUT_SECONDS if connect_timeout is None else connect_timeout
        ),
        tls=tls_files(settings),
        credentials=credentials(settings, password),
    )

"""Logging: structlog key/value events, with tokens kept out of them by ``redact``.

Tokens are named by ``token_hash`` (16 hex chars). The redaction processors (see
``redact``) are the last line of defence, run on every event and on its rendered line.

Under systemd, when stderr is the journal's stream (``JOURNAL_STREAM``), every line starts
with its syslog priority (``<3>`` error ... ``<7>`` debug, sd-daemon(3)) so that journald
files it at the right level, and carries no timestamp of its own: journald adds one.

When stderr is a regular file opened for appending (launchd's StandardErrorPath on macOS,
or ``2>>file``), nothing rotates it: the daemon keeps it bounded itself (see MAX_LOG_BYTES).
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import shutil
import stat
import sys
import threading
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, TextIO, cast

import structlog

from .redact import redact_processor, redact_rendered

__all__ = [
    "StdlibToStructlog",
    "configure_logging",
    "is_journal_stream",
    "journal_stream_id",
]

#: syslog priorities (sd-daemon(3) prefixes) of structlog's level names; anything else is info.
SYSLOG_PRIORITY = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}
_INFO_PRIORITY = 6
#: A log file the daemon appends to is moved aside (to ``<file>.1``, replacing the one
#: before) once it passes this size, so the two never hold more than about twice this.
#: A month of refreshes at info level is well under 1 MiB; a failing endpoint's warnings
#: are rate-limited, so 10 MiB keeps weeks of history without filling a disk.
MAX_LOG_BYTES = 10 * 1024 * 1024


def journal_stream_id(value: str | None) -> tuple[int, int] | None:
    """The (device, inode) in a ``JOURNAL_STREAM`` value ("DEV:INO", decimal), or None."""
    if not value:
        return None
    dev, sep, ino = value.partition(":")
    if not sep or not all(part.isascii() and part.isdigit() for part in (dev, ino)):
        return None
    return int(dev), int(ino)


def is_journal_stream(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """True if ``stream`` is the journal stream systemd connected (systemd.exec(7)).

    JOURNAL_STREAM is inherited by children whose stderr goes elsewhere (a shell started
    from the service, a redirect), so it counts only when the stream's own device and inode
    match it.
    """
    wanted = journal_stream_id(environ.get("JOURNAL_STREAM"))
    if wanted is None:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False  # not a real file (a buffer in tests), or closed
    return (st.st_dev, st.st_ino) == wanted


class _JournalPrefixed:
    """A renderer whose every line starts with the event's syslog priority, ``<N>``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        level = str(event_dict.get("level", method)).lower()
        prefix = f"<{SYSLOG_PRIORITY.get(level, _INFO_PRIORITY)}>"
        rendered = self._inner(logger, method, event_dict)
        # journald files each line on its own: a traceback's lines keep the event's priority.
        return "\n".join(prefix + line for line in str(rendered).split("\n"))


def _fd_path(fd: int) -> str | None:
    """The path an open file descriptor refers to (macOS: F_GETPATH; Linux: /proc)."""
    try:
        if hasattr(fcntl, "F_GETPATH"):
            raw = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024))
            return os.fsdecode(raw.split(b"\0", 1)[0])
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _appended_file(stream: TextIO) -> Path | None:
    """The path of ``stream`` if it is a regular file opened with O_APPEND, else None."""
    try:
        fd = stream.fileno()
        st = os.fstat(fd)
        appending = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
    except (OSError, ValueError, io.UnsupportedOperation):
        return None  # not a real file (a buffer in tests), or closed
    if not (stat.S_ISREG(st.st_mode) and appending):
        return None
    path = _fd_path(fd)
    try:
        # The name must still be this file: a deleted or moved-over one is left alone.
        return Path(path) if path and os.path.samestat(os.stat(path), st) else None
    except OSError:
        return None


class BoundedLogFile:
    """A stream over a file opened for appending that moves the file aside when it is full.

    The file is copied to ``<file>.1`` and emptied in place (ftruncate): renaming it would
    leave this process (and launchd's stdout) writing into the renamed file. O_APPEND makes
    the next write land at the new end.
    """

    def __init__(self, stream: TextIO, path: Path, limit: int = MAX_LOG_BYTES) -> None:
        self._stream = stream
        self._path = path
        self._limit = limit
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            written = self._stream.write(text)
            if text.endswith("\n"):  # rotate between lines, never inside one
                self._stream.flush()
                self._rotate_if_full()
            return written

    def _rotate_if_full(self) -> None:
        try:
            fd = self._stream.fileno()
            if os.fstat(fd).st_size <= self._limit:
                return
            older = self._path.with_name(self._path.name + ".1")
            tmp = self._path.with_name(f".{self._path.name}.1.tmp")
            with tmp.open("wb") as out, self._path.open("rb") as src:  # our fd is write-only
                shutil.copyfileobj(src, out)
            os.replace(tmp, older)
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only disk: keep logging to the file as it is

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._stream.fileno()


class StdlibToStructlog(logging.Handler):
    """Records of libraries' stdlib loggers (APScheduler's missed runs, say) as structlog
    events: rendered, redacted and prefixed with their priority like the daemon's own.

    Without it Python's last-resort handler writes them bare, and the journal files a
    warning as an error (the unit's ``SyslogLevel=err`` for lines without a priority).
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            method = level if level in ("debug", "info", "warning", "error", "critical") else "info"
            logger = structlog.get_logger(record.name)
            getattr(logger, method)(record.getMessage(), logger_name=record.name,
                                    exc_info=record.exc_info or False)  # fmt: skip
        except Exception:
            self.handleError(record)


def _route_stdlib_logging() -> None:
    """Send stdlib logging (warnings and worse) through structlog; once, however often called."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StdlibToStructlog)]:
        root.removeHandler(handler)
    root.addHandler(StdlibToStructlog(logging.WARNING))


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    environ: Mapping[str, str] = os.environ,
    max_file_bytes: int = MAX_LOG_BYTES,
) -> None:
    """Console renderer on a terminal, JSON lines otherwise (``fmt`` may force either).

    On the journal's stream each line carries its syslog priority and no timestamp; a file
    opened for appending is kept under ``max_file_bytes`` (the older part goes to ``.1``).
    """
    stream = stream or sys.stderr
    appended = _appended_file(stream)
    if appended is not None:
        stream = cast(TextIO, BoundedLogFile(stream, appended, max_file_bytes))
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    stamp: list[Any] = [structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if is_journal_stream(stream, environ):
        renderer = _JournalPrefixed(renderer)
        stamp = []  # journald stamps each line as it arrives
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *stamp,
            redact_processor,
            structlog.processors.format_exc_info,
            renderer,
            redact_rendered,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging()

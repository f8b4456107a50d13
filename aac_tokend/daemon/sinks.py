"""Where alerts go: the daemon's log, the user's hook command, a desktop notification.

Commands run without a shell, in the background, with a minimal environment built from
scratch, and are killed (with their whole process group) when they overrun. ``Alerter``
(``alerts``) decides when to alert; a sink only delivers, quickly, and should not raise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import structlog

from ..core.conditions import AlertEvent
from ..core.config import Config

__all__ = [
    "DESKTOP_INHERITED",
    "HOOK_INHERITED",
    "AlertSink",
    "CommandSink",
    "DesktopSink",
    "LogSink",
    "build_sinks",
    "hook_environment",
]

log = structlog.get_logger(__name__)

#: Long enough for notify-send to reach a busy session bus; a stuck one must not pile up.
DESKTOP_TIMEOUT_SECONDS = 10.0

#: The only variables a hook inherits from us: enough to find programs and the user's files.
#: Everything else (proxies with passwords, cloud credentials) stays out.
HOOK_INHERITED = ("PATH", "HOME", "LANG", "USER")

#: notify-send needs the session bus and display to reach the desktop; none is a secret.
DESKTOP_INHERITED = (
    *HOOK_INHERITED,
    "DBUS_SESSION_BUS_ADDRESS",
    "XDG_RUNTIME_DIR",
    "DISPLAY",
    "WAYLAND_DISPLAY",
)


class AlertSink(Protocol):
    """Somewhere an alert goes. ``send`` must return quickly and should not raise."""

    def send(self, profile: str, event: AlertEvent, message: str) -> None: ...


class LogSink:
    """Alerts as ``alert`` error events in the daemon's log."""

    def send(self, profile: str, event: AlertEvent, message: str) -> None:
        # structlog reserves ``event`` for the event name, hence ``alert_event``. A recovery
        # needs nobody: info, so a journal filter on errors (priority 3) shows only alerts.
        say = log.info if event is AlertEvent.RECOVERED else log.error
        say("alert", profile=profile, alert_event=str(event), message=message)


def _inherited(environ: Mapping[str, str], names: Sequence[str]) -> dict[str, str]:
    return {name: environ[name] for name in names if name in environ}


def hook_environment(
    profile: str, event: AlertEvent, message: str, environ: Mapping[str, str]
) -> dict[str, str]:
    """The complete environment of a hook: a few inherited variables plus the alert."""
    return {
        **_inherited(environ, HOOK_INHERITED),
        "AAC_TOKEND_PROFILE": profile,
        "AAC_TOKEND_EVENT": str(event),
        "AAC_TOKEND_MESSAGE": message,
    }


class _Runner:
    """Runs commands in background threads, each killed with its group after a timeout."""

    def __init__(self, timeout: float, what: str) -> None:
        self._timeout = timeout
        self._what = what  # names the sink in log events
        self._idle = threading.Condition()
        self._active = 0

    def start(self, argv: Sequence[str], env: Mapping[str, str], profile: str) -> None:
        with self._idle:
            self._active += 1
        thread = threading.Thread(
            target=self._run,
            args=(tuple(argv), dict(env), profile),
            name=f"aac-tokend-{self._what}",
            daemon=True,  # a hook never holds up exit; its timeout bounds it anyway
        )
        try:
            thread.start()
        except RuntimeError as exc:  # no threads left: drop this alert, say so
            self._done()
            log.warning(f"{self._what}_not_started", profile=profile, error=str(exc))

    def _run(self, argv: tuple[str, ...], env: dict[str, str], profile: str) -> None:
        try:
            self._run_one(argv, env, profile)
        finally:
            self._done()

    def _run_one(self, argv: tuple[str, ...], env: dict[str, str], profile: str) -> None:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd="/",  # not the daemon's directory: nothing to hold busy, nothing relative
                start_new_session=True,  # its own process group, so a timeout kills it all
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            log.warning(
                f"{self._what}_not_started", profile=profile, command=argv[0], error=str(exc)
            )
            return
        try:
            status = proc.wait(self._timeout)
        except subprocess.TimeoutExpired:
            # not yet reaped, so the group id cannot have been reused
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.warning(
                f"{self._what}_timed_out",
                profile=profile,
                command=argv[0],
                timeout_seconds=self._timeout,
            )
            return
        if status != 0:
            log.warning(f"{self._what}_failed", profile=profile, command=argv[0], status=status)

    def _done(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no command runs; False if some still did after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._active:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True


class CommandSink:
    """Runs the user's hook command (config ``on_alert``) with the alert in its environment."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 10.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if not argv:
            raise ValueError("CommandSink needs a command")
        self._argv = tuple(argv)
        self._environ = os.environ if environ is None else environ  # only a few are passed
        self._runner = _Runner(timeout, "alert_command")

    def send(self, profile: str, event: AlertEvent, message: str) -> None:
        env = hook_environment(profile, event, message, self._environ)
        self._runner.start(self._argv, env, profile)

    def wait_idle(self, timeout: float) -> bool:
        """Wait for running hooks to end; False if some still ran after ``timeout`` seconds."""
        return self._runner.wait_idle(timeout)


class DesktopSink:
    """A desktop notification: notify-send on Linux, osascript on macOS, else nothing."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        platform: str = sys.platform,
        environ: Mapping[str, str] | None = None,
        timeout: float = DESKTOP_TIMEOUT_SECONDS,
    ) -> None:
        self._environ = os.environ if environ is None else environ
        # looked up once: the notifier does not come and go while the daemon runs
        self._program = self._find(platform) if enabled else None
        self._platform = platform
        self._runner = _Runner(timeout, "desktop_notification")

    @property
    def available(self) -> bool:
        """True when notifications are on and a notifier was found."""
        return self._program is not None

    def _find(self, platform: str) -> str | None:
        name = "notify-send" if platform.startswith("linux") else None
        name = "osascript" if platform == "darwin" else name
        return shutil.which(name, path=self._environ.get("PATH")) if name else None

    def argv(self, profile: str, message: str) -> tuple[str, ...] | None:
        """The notifier command for an alert, or None when there is no notifier."""
        if self._program is None:
            return None
        title = f"aac-tokend: {profile}"
        if self._platform == "darwin":
            # title and message travel as arguments, never inside the script's source,
            # so no quote in them can end a string literal and change the script
            return (
                self._program,
                "-e",
                "on run argv",
                "-e",
                "display notification (item 2 of argv) with title (item 1 of argv)",
                "-e",
                "end run",
                title,
                message,
            )
        return (self._program, "--", title, message)  # "--": no text is read as an option

    def send(self, profile: str, event: AlertEvent, message: str) -> None:
        argv = self.argv(profile, message)
        if argv is not None:
            self._runner.start(argv, _inherited(self._environ, DESKTOP_INHERITED), profile)

    def wait_idle(self, timeout: float) -> bool:
        """Wait for running notifiers to end; False if some still ran after ``timeout``."""
        return self._runner.wait_idle(timeout)


def build_sinks(config: Config, environ: Mapping[str, str] | None = None) -> list[AlertSink]:
    """The sinks a config asks for: always the log, then the desktop and the hook."""
    sinks: list[AlertSink] = [LogSink()]
    desktop = DesktopSink(enabled=config.notifications, environ=environ)
    if desktop.available:
        sinks.append(desktop)
    if config.on_alert:
        sinks.append(
            CommandSink(config.on_alert, timeout=config.alert_timeout_seconds, environ=environ)
        )
    return sinks

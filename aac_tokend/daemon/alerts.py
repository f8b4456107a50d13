"""Telling a person that a profile needs them: once per change, never a storm.

``Alerter`` turns the stream of conditions (see ``conditions``) into alerts: one when the
condition changes, a reminder when it has lasted ``reminder_interval``, one on recovery.
Sinks (``sinks``) deliver them: the log, a user's hook command, a desktop notification.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from ..core.conditions import AlertEvent, Condition
from .sinks import AlertSink

__all__ = ["Alerter"]

log = structlog.get_logger(__name__)

#: A day: someone who ignored an alert still hears about it daily, not hourly.
REMINDER_INTERVAL_SECONDS = 86400.0


@dataclass
class _Remembered:
    """The condition last alerted for a profile, and when it was last said."""

    condition: Condition
    sent_at: float


def _recovered_message(profile: str, was: Condition) -> str:
    if was.event is AlertEvent.REFRESH_EXPIRES_SOON:
        return f"profile {profile} recovered: its token no longer expires soon"
    return f"profile {profile} recovered: a valid token is being served again"


class Alerter:
    """Sends an alert when a profile's condition changes, a daily reminder, and recovery."""

    def __init__(
        self, sinks: Sequence[AlertSink], *, reminder_interval: float = REMINDER_INTERVAL_SECONDS
    ) -> None:
        self._lock = threading.Lock()
        self._sinks = tuple(sinks)
        self._reminder_interval = reminder_interval
        self._remembered: dict[str, _Remembered] = {}

    def observe(self, profile: str, condition: Condition | None, now: float) -> None:
        """Report ``profile``'s current condition (None: all well) at ``now``."""
        with self._lock:
            alert = self._decide(profile, condition, now)
            sinks = self._sinks
        if alert is not None:
            self._send(sinks, profile, *alert)

    def _decide(
        self, profile: str, condition: Condition | None, now: float
    ) -> tuple[AlertEvent, str] | None:
        remembered = self._remembered.get(profile)
        if condition is None:
            if remembered is None:
                return None
            del self._remembered[profile]
            return AlertEvent.RECOVERED, _recovered_message(profile, remembered.condition)
        if remembered is None or remembered.condition.key != condition.key:
            self._remembered[profile] = _Remembered(condition, now)
            return condition.event, condition.message
        if now < remembered.sent_at:
            remembered.sent_at = now  # the clock went back: count the interval from here
        if now - remembered.sent_at >= self._reminder_interval:
            remembered.sent_at = now
            return condition.event, condition.message
        return None

    @staticmethod
    def _send(sinks: Sequence[AlertSink], profile: str, event: AlertEvent, message: str) -> None:
        for sink in sinks:
            try:
                sink.send(profile, event, message)
            except Exception as exc:  # one broken sink must not silence the others
                log.warning(
                    "alert_sink_failed",
                    profile=profile,
                    sink=type(sink).__name__,
                    error=f"{type(exc).__name__}: {exc}"[:200],
                )

    def forget(self, profile: str) -> None:
        """Drop what is remembered of ``profile`` (it was removed); sends nothing."""
        with self._lock:
            self._remembered.pop(profile, None)

    def set_sinks(self, sinks: Sequence[AlertSink]) -> None:
        """Use ``sinks`` from now on (after a config reload)."""
        with self._lock:
            self._sinks = tuple(sinks)

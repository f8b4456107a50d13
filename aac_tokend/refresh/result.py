"""How one courier's errand ended: the typed answer a refresher gives the engine.

It crosses a process boundary (a pipe from a forked or spawned courier), so it has a small
JSON form; anything unreadable on that pipe is ``LOST``, never a guess.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["CourierKind", "CourierResult"]


class CourierKind(StrEnum):
    """What the courier came to. The value is its name in logs (``courier=...``)."""

    REFRESHED = "refreshed"  # the server rotated; the new pair is durable
    REJECTED = "rejected"  # the server refused with a terminal OAuth error; durable
    TRANSIENT = "transient"  # no usable answer; the failure is durable, retry later
    STATE_CHANGED = "state_changed"  # the stored state moved on: nothing was sent
    BUSY = "busy"  # another writer held the profile's lock: nothing was sent
    CORRUPT = "corrupt"  # the stored state cannot be read back: nothing was sent
    STORAGE_FAILED = "storage_failed"  # a write failed; ``unsaved`` holds a sealed outcome
    LOST = "lost"  # the courier ended without an answer (killed, crashed, timed out)
    NOT_STARTED = "not_started"  # no courier ran (it could not be started, or came too late)

    @property
    def durable(self) -> bool:
        """True if the store holds this attempt's outcome (the engine reads it back)."""
        return self in (CourierKind.REFRESHED, CourierKind.REJECTED, CourierKind.TRANSIENT)


@dataclass(frozen=True)
class CourierResult:
    """A courier's answer. ``unsaved`` is a sealed state the store refused (see
    ``StateStore.seal``): the only copy of a rotated pair until someone saves it."""

    kind: CourierKind
    detail: str = ""
    unsaved: bytes | None = None

    def to_bytes(self) -> bytes:
        blob = base64.b64encode(self.unsaved).decode() if self.unsaved else None
        return json.dumps(
            {"kind": self.kind.value, "detail": self.detail, "unsaved": blob}
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CourierResult:
        """The result a courier wrote; ``LOST`` for anything that is not one."""
        try:
            data = json.loads(raw)
            blob = data.get("unsaved")
            return cls(
                CourierKind(data["kind"]),
                str(data["detail"]),
                base64.b64decode(blob, validate=True) if blob else None,
            )
        except (ValueError, KeyError, TypeError):
            return cls(CourierKind.LOST, "the courier ended without a readable answer")

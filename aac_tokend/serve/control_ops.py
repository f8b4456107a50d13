"""The control socket's operations: one method per ``op``, answers as plain dicts.

Request and response fields are documented in the README ("Control protocol").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import StrEnum

from .. import __version__
from ..core.importer import ImportRequest
from ..core.report import RowState, StatusRow, Verdict, verdict
from ..daemon.engine import Engine
from ..errors import (
    AacTokendError,
    BusyError,
    InputError,
    NoTokenError,
    NoTokenYetError,
    ProfileError,
    StateCorruptError,
    StorageError,
)

__all__ = ["ControlOps", "Lookup"]


class Lookup(StrEnum):
    """What a request's profile name comes to, before any op touches it."""

    FOUND = "found"  # served: the op goes ahead
    WAITING = "waiting"  # a courier of an earlier daemon still holds it: busy, for seconds
    CORRUPT = "corrupt"  # its file cannot be decrypted or parsed
    UNREADABLE = "unreadable"  # its file (or lock) cannot be read
    MISNAMED = "misnamed"  # a file whose name is not a profile's
    MISSING = "missing"  # no such profile

    @property
    def unusable(self) -> bool:
        """A file that exists and cannot be used (status shows it; remove deletes it)."""
        return self in (Lookup.CORRUPT, Lookup.UNREADABLE, Lookup.MISNAMED)


_LOOKUP_OF_STATE = {
    RowState.CORRUPT: Lookup.CORRUPT,
    RowState.UNREADABLE: Lookup.UNREADABLE,
    RowState.MISNAMED: Lookup.MISNAMED,
}


def _fail(code: str, message: str) -> dict[str, object]:
    return {"ok": False, "code": code, "message": message}


class ControlOps:
    """Dispatches control requests to the engine (and to the daemon for reload/shutdown)."""

    #: Ops that can wait up to a minute: a refresh for the token endpoint, an import or a
    #: remove for the profile lock a refresh holds. The server keeps them off its workers.
    WAITING_OPS = frozenset({"refresh", "import", "remove"})

    def __init__(
        self,
        engine: Engine,
        *,
        reload: Callable[[], None],
        shutdown: Callable[[], None],
    ) -> None:
        self._engine = engine
        self._reload = reload
        self._shutdown = shutdown

    def handle(self, request: dict[str, object]) -> dict[str, object]:
        op = request.get("op")
        method = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if method is None:
            return _fail("unknown_op", f"unknown op {str(op)[:40]!r}; see the README's protocol")
        try:
            answer: dict[str, object] = method(request)
            return answer
        except AacTokendError as exc:
            return _fail(exc.code, str(exc))

    def _lookup(self, name: str) -> tuple[Lookup, StatusRow | None]:
        """What ``name`` comes to, and the row that says why when it cannot be used."""
        if name in self._engine.profiles():
            return Lookup.FOUND, None
        if self._engine.waiting_for_courier(name):
            return Lookup.WAITING, None
        # A profile whose file cannot be read exists: say so, not "no profile".
        for row in self._engine.status(only=name):
            if row.state.unusable:
                return _LOOKUP_OF_STATE[row.state], row
        return Lookup.MISSING, None

    def _profile(self, request: dict[str, object], *, unusable_ok: bool = False) -> str:
        name = request.get("profile", "default")
        if not isinstance(name, str):
            raise InputError("'profile' must be a string")
        found, row = self._lookup(name)
        if found is Lookup.FOUND or (unusable_ok and found.unusable):
            return name  # remove: deleting an unusable file is the way out, as offline
        if found is Lookup.WAITING:
            raise BusyError(
                f"profile {name}: a refresh begun before the daemon restarted is still "
                "finishing; try again in a few seconds"
            )
        if found is Lookup.CORRUPT and row is not None:
            raise StateCorruptError(str(row.alert))
        if found.unusable and row is not None:
            raise StorageError(str(row.alert))
        raise ProfileError(f"no profile named {name[:70]!r}; import one first")

    def _report(self, name: str) -> StatusRow:
        return next(row for row in self._engine.status(only=name) if row.profile == name)

    def op_token(self, request: dict[str, object]) -> dict[str, object]:
        name = self._profile(request)
        token = self._engine.current_token(name)
        if token is None:
            row = self._report(name)
            reason = (
                row.alert
                or row.last_error
                or "the access token has expired and no new one is here yet"
            )
            # The same rule as `status --check`: only what needs a person is no_token (69).
            error = NoTokenError if verdict(row) is Verdict.NEEDS_PERSON else NoTokenYetError
            raise error(f"profile {name}: no valid token ({row.state.value}): {reason}")
        return {"ok": True, "profile": name, "token": token.decode()}

    def op_status(self, request: dict[str, object]) -> dict[str, object]:
        return {
            "ok": True,
            "daemon": {"pid": os.getpid(), "version": __version__},
            "profiles": [row.to_wire() for row in self._engine.status()],
        }

    def op_profiles(self, request: dict[str, object]) -> dict[str, object]:
        return {"ok": True, "profiles": self._engine.listed()}

    def op_refresh(self, request: dict[str, object]) -> dict[str, object]:
        name = self._profile(request)
        self._engine.refresh(name, wait=True)
        return {"ok": True, "profile": self._report(name).to_wire()}

    def op_import(self, request: dict[str, object]) -> dict[str, object]:
        state, changed = self._engine.claim_import(ImportRequest.from_wire(dict(request)))
        return {"ok": True, "profile": self._report(state.profile).to_wire(), "changed": changed}

    def op_remove(self, request: dict[str, object]) -> dict[str, object]:
        name = self._profile(request, unusable_ok=True)
        self._engine.remove(name)
        return {"ok": True, "removed": name}

    def op_reload(self, request: dict[str, object]) -> dict[str, object]:
        self._reload()
        return {"ok": True}

    def op_shutdown(self, request: dict[str, object]) -> dict[str, object]:
        self._shutdown()
        return {"ok": True}

"""The control socket's operations: one method per ``op``, answers as plain dicts.

Request and response fields are documented in the README ("Control protocol").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..core.importer import ImportRequest
from ..core.report import verdict
from ..daemon.engine import UNUSABLE_STATES, Engine
from ..errors import (
    AacTokendError,
    BusyError,
    InputError,
    ProfileError,
    StateCorruptError,
    StorageError,
)
from .control_server import error_code

__all__ = ["ControlOps", "code_for"]


code_for = error_code  # one mapping of errors to wire codes, shared with the server


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
            return _fail(code_for(exc), str(exc))

    def _profile(self, request: dict[str, object], *, unusable_ok: bool = False) -> str:
        name = request.get("profile", "default")
        if not isinstance(name, str):
            raise InputError("'profile' must be a string")
        if name not in self._engine.profiles():
            if self._engine.waiting_for_courier(name):
                raise BusyError(
                    f"profile {name}: a refresh begun before the daemon restarted is still "
                    "finishing; try again in a few seconds"
                )
            # A profile whose file cannot be read exists: say so, not "no profile".
            for row in self._engine.status(only=name):
                if unusable_ok and row["state"] in UNUSABLE_STATES:
                    return name  # remove: deleting the file is the way out, as offline
                if row["state"] == "corrupt":
                    raise StateCorruptError(str(row["alert"]))
                if row["state"] in UNUSABLE_STATES:
                    raise StorageError(str(row["alert"]))
            raise ProfileError(f"no profile named {name[:70]!r}; import one first")
        return name

    def _report(self, name: str) -> dict[str, Any]:
        return next(row for row in self._engine.status(only=name) if row["profile"] == name)

    def op_token(self, request: dict[str, object]) -> dict[str, object]:
        name = self._profile(request)
        token = self._engine.current_token(name)
        if token is None:
            row = self._report(name)
            reason = (
                row["alert"]
                or row["last_error"]
                or "the access token has expired and no new one is here yet"
            )
            # The same rule as `status --check`: only what needs a person is no_token (69).
            code = "no_token" if verdict(row) == "needs_person" else "no_token_yet"
            return _fail(code, f"profile {name}: no valid token ({row['state']}): {reason}")
        return {"ok": True, "profile": name, "token": token.decode()}

    def op_status(self, request: dict[str, object]) -> dict[str, object]:
        return {
            "ok": True,
            "daemon": {"pid": os.getpid(), "version": __version__},
            "profiles": self._engine.status(),
        }

    def op_profiles(self, request: dict[str, object]) -> dict[str, object]:
        return {"ok": True, "profiles": self._engine.listed()}

    def op_refresh(self, request: dict[str, object]) -> dict[str, object]:
        name = self._profile(request)
        self._engine.refresh(name, wait=True)
        return {"ok": True, "profile": self._report(name)}

    def op_import(self, request: dict[str, object]) -> dict[str, object]:
        state, changed = self._engine.claim_import(ImportRequest.from_wire(dict(request)))
        return {"ok": True, "profile": self._report(state.profile), "changed": changed}

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

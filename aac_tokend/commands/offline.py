"""What the commands do without a daemon: read the stored state, import and remove.

Reading never refreshes (only the daemon spends a refresh token). ``import`` and ``remove``
write under the single-owner lock, so no daemon can start in the middle of the write, and
under the profile's lock, as the daemon does; the claim is ``ownership.claim``, the state
``importer.build_state``'s, the store the daemon's. Imports are deferred to each function:
``token`` without a daemon pays only for the store.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TYPE_CHECKING

from ..errors import AacTokendError, ProfileError, StateCorruptError, StorageError

if TYPE_CHECKING:
    from ..core.importer import ImportRequest
    from ..core.report import StatusRow
    from ..core.state import ProfileState
    from ..host.paths import Paths
    from ..store.files import FileStore

__all__ = ["import_state", "load_profile", "profile_names", "remove_profile", "status_rows"]

#: How long an import waits for the profile's lock (a courier of a killed daemon holds it
#: until its outcome is on disk, within its own bound).
IMPORT_LOCK_SECONDS = 10.0


def _misnamed_advice(store: FileStore, name: str, exc: ProfileError) -> str:
    from ..daemon.adoption import misnamed_advice  # the daemon's advice, word for word

    return misnamed_advice(store.where(name), exc)


def load_profile(paths: Paths, name: str) -> ProfileState | None:
    """The stored state of ``name`` (None: no such profile), a misnamed file refused as the
    daemon refuses it (StorageError, 69)."""
    from ..store.opening import open_stored_state

    store = open_stored_state(paths)
    if store is None:
        return None
    try:
        return store.load(name)
    except ProfileError as exc:
        if name not in store.profiles():
            raise  # no such file: a bad name typed, not a bad file found
        raise StorageError(_misnamed_advice(store, name, exc)) from exc


def profile_names(paths: Paths) -> list[str]:
    """Every stored profile's name, unusable ones included (as the daemon lists them)."""
    from ..store.opening import open_stored_state

    store = open_stored_state(paths)
    return store.profiles() if store else []


def status_rows(paths: Paths) -> list[StatusRow]:
    """Each stored profile's status row, as the daemon would report it (no next refresh,
    no token socket: nothing is served)."""
    from ..core.report import RowState, report_row
    from ..store.opening import open_stored_state

    store = open_stored_state(paths)
    if store is None:
        return []
    rows = []
    for name in store.profiles():
        try:
            state = store.load(name)
        except AacTokendError as exc:
            # The daemon's words for it (RowState.unusable), without running it.
            kind, alert = RowState.UNREADABLE, str(exc)
            if isinstance(exc, StateCorruptError):
                kind = RowState.CORRUPT
            elif isinstance(exc, ProfileError):
                kind, alert = RowState.MISNAMED, _misnamed_advice(store, name, exc)
            rows.append(report_row(profile=name, state=kind, alert=alert))
            continue
        if state is not None:
            rows.append(profile_row(paths, state))
    return rows


def profile_row(paths: Paths, state: ProfileState) -> StatusRow:
    """``state``'s status row as the daemon would report it, now (nothing served)."""
    from ..core.report import profile_report
    from ..host.configfile import load_config

    try:
        days = load_config(paths.config_dir).policy_for(state.profile).refresh_lifetime_days
    except AacTokendError:
        days = None  # status still answers; `aac-tokend run` says what is wrong with it
    return profile_report(
        state, time.time(), next_refresh=None, token_socket=None, lifetime_days=days
    )


def import_state(paths: Paths, request: ImportRequest, state: ProfileState) -> bool:
    """Claim ``state`` in the store, as the daemon's import does; False: it was the current
    pair, nothing changed."""
    from ..core.ownership import claim, stored_states
    from ..store.opening import open_file_store
    from ..store.owner import OwnerLock

    with OwnerLock(paths.daemon_lock):
        store = open_file_store(paths)
        with store.locked(state.profile, IMPORT_LOCK_SECONDS):
            current = store.load(state.profile)
            own = [current] if current is not None else []
            # A pair a dead daemon could not save: its generation counts too (claim).
            with contextlib.suppress(AacTokendError):
                blob = store.pending(state.profile)
                if blob is not None:
                    own.append(store.unseal(state.profile, blob))
            others = stored_states(store, skip={state.profile})
            claimed = claim(state, own, others, replace_chain=request.replace_chain)
            if claimed is not None:
                store.save(claimed)
                store.clear_pending(state.profile)  # a new chain: an old one's pair is moot
    return claimed is not None


def remove_profile(paths: Paths, name: str) -> None:
    """Delete ``name``'s state (and any pair a dead daemon left unsaved)."""
    from ..core.state import validate_profile_name
    from ..refresh.courier import WAIT_SECONDS
    from ..store.opening import open_file_store
    from ..store.owner import OwnerLock

    with OwnerLock(paths.daemon_lock):
        store = open_file_store(paths)
        try:
            validate_profile_name(name)
        except ProfileError as exc:
            if name not in store.profiles():
                raise  # no such file: a bad name typed, not a bad file found
            # a misnamed file: moved aside by hand, never deleted by a name it cannot have
            raise StorageError(_misnamed_advice(store, name, exc)) from exc
        # Like the daemon: a courier (of a daemon killed mid-refresh) holds the lock
        # until its outcome is on disk; deleting under it would let it write back.
        if not store.lock_is_free(name):
            print(f"waiting for a refresh of {name} to finish...", file=sys.stderr)
        with store.locked(name, WAIT_SECONDS):
            store.delete(name)
            store.clear_pending(name)  # never adopted back

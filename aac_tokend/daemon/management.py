"""Managing profiles: an import takes effect at once, a removal stops and deletes.

Both run under the profile's lock, as a courier does, so memory changes in the order the
store did; an import is also checked against every holder of the pair it brings
(core/ownership.py), one import at a time.
"""

from __future__ import annotations

import contextlib

import structlog

from ..core.importer import ImportRequest, build_state
from ..core.ownership import claim, stored_states
from ..core.state import ProfileState
from ..errors import AacTokendError, ProfileError
from ..host.paths import check_token_socket
from ..refresh.courier import WAIT_SECONDS
from .serving import Serving

__all__ = ["Management"]

log = structlog.get_logger("aac_tokend.daemon.engine")


class Management(Serving):
    """Import and remove."""

    def import_profile(self, request: ImportRequest) -> ProfileState:
        """A new token pair takes effect at once; the old state is replaced durably."""
        return self.claim_import(request)[0]

    def claim_import(self, request: ImportRequest) -> tuple[ProfileState, bool]:
        """Import unless another profile holds the pair or it is spent; (state, changed).

        Re-importing the current pair changes nothing (False). TokenHeldError or
        TokenSpentError leave every chain untouched.
        """
        # config.toml's refresh_lifetime_days is not copied in: it is read at use time
        # (_lifetime_days), so a corrected config applies after a reload.
        state = build_state(request, self._clock.now())
        # Everything that can fail at serve time fails here, before anything is saved.
        check_token_socket(state.profile, self._socket_path(state.profile))
        # One import at a time: two imports of one pair into two profiles must not both
        # pass the check before either is saved.
        with self._import_lock, self._store.locked(state.profile, WAIT_SECONDS):
            own, others = self._holders(state.profile)
            claimed = claim(state, own, others, replace_chain=request.replace_chain)
            if claimed is None:
                log.info("profile_import_unchanged", profile=state.profile)
                return max(own, key=lambda s: s.generation), False
            self._store.save(claimed)
            self._clear_pending(claimed.profile)  # a new chain: an old one's pair is moot
            self._hold(claimed)  # under the lock that wrote it; drops any unsaved pair
        self._announce(claimed.profile)  # the alerter hears the new condition: often a recovery
        self._on_profiles_changed()
        log.info("profile_imported", profile=claimed.profile, kind=claimed.kind.value)
        return claimed, True

    def _holders(self, name: str) -> tuple[list[ProfileState], list[ProfileState]]:
        """Every version of every profile we can see: ``name``'s own, and all others'.

        Memory counts as well as disk: a refresh the disk refused leaves its newer pair
        only here (``unsaved``). Other profiles the engine holds are taken from memory only
        (reading a thousand files costs most of a second, with token reads waiting on the
        GIL): the only newer pair their files can hold is one a courier got a moment ago,
        which nobody but that courier has seen, and memory already names its predecessor.
        Profiles not in memory (still waiting for a courier) are read from disk; while a
        state file cannot be read at all, HolderUnknownError refuses the import.
        """
        with self._lock:
            memory = [entry.state for entry in self._profiles.values()]
        own = [s for s in memory if s.profile == name]
        with contextlib.suppress(AacTokendError):
            on_disk = self._store.load(name)
            if on_disk is not None:
                own.append(on_disk)
        with contextlib.suppress(AacTokendError):  # its generation counts (ownership.claim)
            blob = self._store.pending(name)
            if blob is not None:
                own.append(self._store.unseal(name, blob))
        others = [s for s in memory if s.profile != name]
        loaded = {s.profile for s in memory} | {name}
        others.extend(stored_states(self._store, skip=loaded))
        return own, others

    def remove(self, name: str) -> None:
        """Stop serving and refreshing ``name`` and delete its state.

        A profile served whose state file is already gone (moved away by hand) is forgotten:
        the removal is done, not refused.
        """
        with self._store.locked(name, WAIT_SECONDS):
            try:
                self._store.delete(name)
            except ProfileError:
                if name not in self._profiles:
                    raise
            self._clear_pending(name)
            self._forget_locked(name)
        self._after_forget(name)
        log.info("profile_removed", profile=name)

"""A chain has one owner: who holds a refresh token, and which tokens are already spent.

Under rotation a refresh token may be presented once: the holder that presents it again
(a second profile with a copy, or a re-import of a pair the chain has already moved past)
makes the server revoke the whole family. So an import is checked against every holder
before it is saved:

- held: another profile's current refresh token (including a profile whose refresh is in
  flight right now, and a newer pair the daemon holds but could not write yet);
- spent: a token some profile has already sent to the token endpoint. Each profile keeps
  the hashes of the tokens it sent, in its encrypted state; a token is recorded when the
  write-ahead journal is written, i.e. before the request leaves, so a crash mid-refresh
  cannot lose the record.

Hashes are ``token_hash`` (the first 64 bits of SHA-256), as the journal's: they sit inside
the encrypted state anyway, and a false "spent" would need a 64-bit collision among a few
hundred hashes.

``claim`` is pure; ``stored_states`` is the one edge (it reads the store).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Iterator
from typing import TYPE_CHECKING

from ..errors import (
    AacTokendError,
    ChainInUseError,
    HolderUnknownError,
    ProfileError,
    StateCorruptError,
    TokenHeldError,
    TokenSpentError,
)
from .state import ProfileState, TokenKind
from .tokens import token_hash

if TYPE_CHECKING:
    from ..store.interface import StateStore

__all__ = [
    "SPENT_HISTORY",
    "SPENT_IMPORTED_HISTORY",
    "claim",
    "remember_spent",
    "stored_states",
]

#: Hashes of rotated-away refresh tokens kept per profile: the last 256. A chain that
#: rotates every 5 minutes sends ~105,000 tokens a year, and the file is rewritten twice
#: per refresh, so the history must stop growing: 256 hashes are ~5 KB and cover about a
#: day at that pace (weeks at an hourly one). A pasted token older than that is refused by
#: the server instead (and the family revoked), which the history can only make less likely.
SPENT_HISTORY = 256
#: The tokens a person pasted are the ones a person pastes again (from a file, a password
#: manager, shell history), however long ago: the last 16 imported tokens that were sent
#: are kept apart, so a year of rotation does not push them out.
SPENT_IMPORTED_HISTORY = 16


def remember_spent(state: ProfileState, refresh_token: str) -> ProfileState:
    """``state`` with ``refresh_token`` recorded as sent (it is about to leave)."""
    digest = token_hash(refresh_token)
    if digest in state.spent_rt_hashes or digest in state.spent_imported_rt_hashes:
        return state  # a retry of the same token: one entry is enough
    # refresh_count counts successful rotations since the import: at 0 the token being
    # sent is the one that was pasted.
    if state.refresh_count == 0:
        imported = (*state.spent_imported_rt_hashes, digest)[-SPENT_IMPORTED_HISTORY:]
        return dataclasses.replace(state, spent_imported_rt_hashes=imported)
    rotated = (*state.spent_rt_hashes, digest)[-SPENT_HISTORY:]
    return dataclasses.replace(state, spent_rt_hashes=rotated)


def _spent_by(state: ProfileState) -> set[str]:
    """Every token hash ``state`` has sent or may have sent (the journal counts)."""
    spent = set(state.spent_rt_hashes) | set(state.spent_imported_rt_hashes)
    for maybe in (state.in_flight.rt_hash if state.in_flight else None, state.ambiguous_rt_hash):
        if maybe is not None:
            spent.add(maybe)
    return spent


def claim(
    new: ProfileState,
    own: Iterable[ProfileState],
    others: Iterable[ProfileState],
    *,
    replace_chain: bool = False,
) -> ProfileState | None:
    """The state to save for an import of ``new``, or None if it is already current.

    ``own`` are the known versions of the importing profile (on disk, in the daemon's memory
    when it holds a newer pair than the disk, and a pending record); the import continues
    their highest generation. ``others`` those of every other
    profile. Raises TokenHeldError or TokenSpentError; neither message contains a token.
    A static token replaces a live OAuth chain only with ``replace_chain`` (ChainInUseError).
    """
    mine = sorted(own, key=lambda s: s.generation)
    current = mine[-1] if mine else None
    if new.kind is TokenKind.LEGACY and current is not None and not replace_chain:
        _refuse_if_live_chain(current)
    if new.kind is TokenKind.OAUTH and new.refresh_token is not None:
        if current is not None and current.refresh_token == new.refresh_token:
            return None  # the current pair again: nothing to do, nothing to send
        _refuse_if_taken(new.profile, new.refresh_token, mine, current, others)
    # A static token is not a chain (nothing to spend twice), but the profile's history
    # outlives every import: its old tokens stay spent.
    if current is None:
        return new
    # The generation goes on from the highest version known (disk, memory, pending record):
    # a pair the disk refused for the old chain must never look newer than this import
    # (pending.follows).
    generation = current.generation + 1
    rotated = tuple(current.spent_rt_hashes)
    for maybe in sorted(_spent_by(current) - set(rotated) - set(current.spent_imported_rt_hashes)):
        rotated = (*rotated, maybe)[-SPENT_HISTORY:]  # a journal of a 0.1.0 file, say
    return dataclasses.replace(
        new,
        generation=generation,
        spent_rt_hashes=rotated,
        spent_imported_rt_hashes=tuple(current.spent_imported_rt_hashes),
    )


def _refuse_if_live_chain(current: ProfileState) -> None:
    # The refresh token in the state may exist nowhere else: overwriting it by a mistaken
    # --legacy is as final as `remove`, which asks first too.
    if current.kind is TokenKind.OAUTH and current.refresh_token and current.rejection is None:
        raise ChainInUseError(
            f"import: profile {current.profile!r} holds a live OAuth chain, and a --legacy "
            "import would delete its refresh token for good: pass --yes to replace it, or "
            "use another --profile"
        )


def _refuse_if_taken(
    profile: str,
    refresh_token: str,
    mine: list[ProfileState],
    current: ProfileState | None,
    others: Iterable[ProfileState],
) -> None:
    digest = token_hash(refresh_token)
    others = list(others)
    newest: dict[str, ProfileState] = {}
    for other in others:
        if other.profile not in newest or other.generation > newest[other.profile].generation:
            newest[other.profile] = other
    for other in newest.values():  # an older copy's token is spent, not held
        if other.refresh_token == refresh_token:
            raise TokenHeldError(
                f"import: profile {other.profile!r} already holds this refresh token; a "
                "rotating chain can have only one holder: use that profile, or `remove` "
                "it first"
            )
    for state in (*mine, *others):
        older = state is not current and state is not newest.get(state.profile)
        if digest in _spent_by(state) or (older and state.refresh_token == refresh_token):
            whose = "this profile" if state.profile == profile else f"profile {state.profile!r}"
            raise TokenSpentError(
                f"import: this refresh token was already sent to the token endpoint by "
                f"{whose} and is spent; presenting it again would make the server revoke "
                "the chain: import the newest pair instead"
            )


def stored_states(store: StateStore, *, skip: Collection[str]) -> Iterator[ProfileState]:
    """Every stored state but those of ``skip``, for an import's check.

    A state file that cannot be read (corrupt, unreadable, misnamed) raises
    HolderUnknownError: the token it holds is unknown and may be the one being imported,
    so no import is judged safe until it is fixed or moved away.
    """
    for name in store.profiles():
        if name in skip:
            continue
        try:
            state = store.load(name)
        except AacTokendError as exc:
            raise HolderUnknownError(
                f"import: state file {store.where(name)} cannot be read "
                f"({_why(exc)}), so the refresh token it holds is unknown and may be this "
                "one; fix that file or move it out of the state directory, then import again"
            ) from exc
        if state is not None:
            yield state


def _why(exc: AacTokendError) -> str:
    if isinstance(exc, StateCorruptError):
        return "corrupt"
    if isinstance(exc, ProfileError):
        return "not named like a profile"
    return "unreadable"

"""Where a fleet keeps what in etcd: one prefix per fleet, three keys per profile.

::

    /aac-tokend/<fleet>/owner/<profile>   the owning host's name, bound to its lease
    /aac-tokend/<fleet>/chain/<profile>   the chain's sealed record (records.py): written
                                          only by the journal, outcome, resolution and
                                          import transactions
    /aac-tokend/<fleet>/gone/<profile>    a sealed tombstone with the last sequence number of
                                          a profile moved out, so that moving it in again
                                          never reuses a sequence a host has already seen

The owner key holds a host name in clear (the operator's view needs it, and it names no
secret); everything under chain/ and gone/ is ciphertext. Fleet and profile names are
validated elsewhere (settings.py, state.validate_profile_name): neither holds a '/'.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["FleetKeys", "KeyKind"]

ROOT = b"/aac-tokend/"


class KeyKind(enum.Enum):
    """Which of a profile's keys a key is."""

    OWNER = b"owner/"
    CHAIN = b"chain/"
    GONE = b"gone/"


@dataclass(frozen=True)
class FleetKeys:
    """The key names of one fleet."""

    fleet: str

    @property
    def root(self) -> bytes:
        """Every key of the fleet starts with this."""
        return ROOT + self.fleet.encode() + b"/"

    def prefix(self, kind: KeyKind) -> bytes:
        """Every key of one kind (a watch or range over all profiles)."""
        return self.root + kind.value

    def owner(self, profile: str) -> bytes:
        return self.prefix(KeyKind.OWNER) + profile.encode()

    def chain(self, profile: str) -> bytes:
        return self.prefix(KeyKind.CHAIN) + profile.encode()

    def gone(self, profile: str) -> bytes:
        return self.prefix(KeyKind.GONE) + profile.encode()

    def parse(self, key: bytes) -> tuple[KeyKind, str] | None:
        """``(kind, profile)`` of one of this fleet's keys; None for any other key."""
        if not key.startswith(self.root):
            return None
        rest = key[len(self.root) :]
        for kind in KeyKind:
            if rest.startswith(kind.value) and len(rest) > len(kind.value):
                try:
                    return kind, rest[len(kind.value) :].decode()
                except UnicodeDecodeError:
                    return None
        return None

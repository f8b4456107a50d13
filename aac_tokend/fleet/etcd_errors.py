"""What the etcd client raises, split by what the caller does next.

    TransientError
    ├── EtcdUnavailableError        no member gave an answer within the call's time limit
    │   ├── EtcdUnsentError             a write that provably never left: nothing was applied
    │   └── EtcdOutcomeUnknownError     a write that may have been applied: resolve by reading
    ├── EtcdLeaseGoneError          the lease named in a request has expired or was revoked
    └── EtcdWatchCompactedError     a watch's start revision is compacted: re-read everything
    AlertError
    └── EtcdAuthError               user, password, certificate or permission refused
    InputError
    └── EtcdRequestError            etcd refused the request as malformed (a bug, not the world)

These subclass the tree of ``aac_tokend.errors`` and are kept here until fleet mode is wired;
they are to move into errors.py then. Messages name the member and etcd's own error text,
never a password or an auth token.
"""

from __future__ import annotations

from ..errors import AlertError, InputError, TransientError

__all__ = [
    "EtcdAuthError",
    "EtcdLeaseGoneError",
    "EtcdOutcomeUnknownError",
    "EtcdRequestError",
    "EtcdUnavailableError",
    "EtcdUnsentError",
    "EtcdWatchCompactedError",
]


class EtcdUnavailableError(TransientError):
    """No member answered within the time limit (for a read: retry later)."""


class EtcdUnsentError(EtcdUnavailableError):
    """A write that no member can have received: it was not applied, retrying is safe."""


class EtcdOutcomeUnknownError(EtcdUnavailableError):
    """A write whose request may have reached etcd and whose reply was lost.

    It may or may not have been applied; the caller finds out with a linearizable read
    (never by sending it again to another member).
    """


class EtcdLeaseGoneError(TransientError):
    """The lease a request names does not exist (expired or revoked)."""


class EtcdWatchCompactedError(TransientError):
    """The revisions a watch needed are compacted away: re-read the keys, then watch again."""

    def __init__(self, message: str, *, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class EtcdAuthError(AlertError):
    """etcd refused our credentials or their permissions: a person has to fix them."""


class EtcdRequestError(InputError):
    """etcd refused the request itself (gRPC ``code`` kept for the caller)."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code

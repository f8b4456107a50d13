"""The one exception tree of aac-tokend, split by what the caller does next.

    class                           wire code              exit  what it is
    AacTokendError                  error                     1
    ├── TransientError              transient                75  retry later (the world, not chain)
    │   ├── EndpointUnavailableError endpoint_unavailable        network, TLS, timeout, 5xx, garbled
    │   ├── BusyError               busy                         a refresh of it is in flight
    │   ├── KeyringUnavailableError (transient)                  the OS keyring is locked or absent
    │   ├── NoTokenYetError         no_token_yet                 no valid token; the daemon retries
    │   ├── EtcdUnavailableError    (transient)                  etcd: no member answered in time
    │   │   ├── EtcdUnsentError     (transient)                  etcd: a write that never left
    │   │   └── EtcdOutcomeUnknownError (transient)              etcd: may have applied
    │   ├── EtcdLeaseGoneError      (transient)                  etcd: the lease is gone
    │   ├── EtcdWatchCompactedError (transient)                  etcd: watch compacted, re-read
    │   ├── FenceLostError          (transient)                  fleet: not the owner, or moved on
    │   └── RateLimitedError        rate_limited                 too many control requests at once
    ├── AlertError                  alert                    69  stop and alert: a person must act
    │   ├── NoTokenError            no_token                     no valid token until a person acts
    │   ├── StateCorruptError       corrupt_state                a state file cannot be read back
    │   ├── StorageError            storage_error                the state could not be made durable
    │   ├── EtcdAuthError           (alert)                      etcd: credentials refused
    │   └── RollbackError           (alert)                      fleet: an older generation
    └── InputError                  bad_request              65  fix the input, then try again
        ├── UsageError              (bad_request)             2  options that do not go together
        ├── TokenFormatError        (bad_request)                not a JWT, or one lacking a claim
        ├── EndpointNotAllowedError (bad_request)                an endpoint we refuse to send to
        ├── ConfigError             config_error             78  a bad key or value in config.toml
        ├── ProfileError            unknown_profile              unknown or unusable profile name
        ├── TokenHeldError          (bad_request)                another profile holds this token
        ├── TokenSpentError         (bad_request)                this refresh token was already sent
        ├── HolderUnknownError      (bad_request)                a state file cannot be read
        ├── ChainInUseError         chain_in_use                 a static token over a live chain
        ├── RequestTooLargeError    request_too_large            a control request over the limit
        ├── AlreadyRunningError     (bad_request)             3  another daemon owns the state
        ├── DaemonNotRunningError   (bad_request)             4  the command needs a daemon
        ├── EtcdRequestError        (bad_request)                etcd: a malformed request
        └── FleetKeyFormatError     (bad_request)                a pasted fleet key is not one

Each class carries its control-socket wire ``code`` (in parentheses: inherited) and the CLI's
``exit_code`` (blank: inherited); ``from_wire`` turns a refusal back into its class by
walking the tree, so the daemon's answer, the exception a Python caller catches and the
CLI's exit status cannot drift apart. A new error code is one class attribute here.

Every message is one line, names what was wrong and what to do, and never contains a token.
Lower-layer exceptions (requests, OSError, cryptography) are translated where they occur,
with ``raise ... from``.

Longer than 300 lines because it is the whole tree, one short class per decision a caller
makes; split, the map above would describe classes in several files.
"""

from __future__ import annotations

__all__ = [
    "AacTokendError",
    "AlertError",
    "AlreadyRunningError",
    "BusyError",
    "ChainInUseError",
    "ConfigError",
    "DaemonNotRunningError",
    "EndpointNotAllowedError",
    "EndpointUnavailableError",
    "EtcdAuthError",
    "EtcdLeaseGoneError",
    "EtcdOutcomeUnknownError",
    "EtcdRequestError",
    "EtcdUnavailableError",
    "EtcdUnsentError",
    "EtcdWatchCompactedError",
    "FenceLostError",
    "FleetKeyFormatError",
    "HolderUnknownError",
    "InputError",
    "KeyringUnavailableError",
    "NoTokenError",
    "NoTokenYetError",
    "ProfileError",
    "RateLimitedError",
    "RequestTooLargeError",
    "RollbackError",
    "StateCorruptError",
    "StorageError",
    "TokenFormatError",
    "TokenHeldError",
    "TokenSpentError",
    "TransientError",
    "UsageError",
    "from_wire",
]


class AacTokendError(Exception):
    """Root of every error aac-tokend raises on purpose."""

    #: the control socket's name for it (``"code"`` of a refusal); a subclass without its own
    #: shares its parent's, and ``from_wire`` gives back the class that defines it
    code = "error"
    #: exit status of the CLI when this error ends a command
    exit_code = 1


class TransientError(AacTokendError):
    """Retry later: nothing is wrong with the chain itself."""

    code = "transient"
    exit_code = 75  # EX_TEMPFAIL


class EndpointUnavailableError(TransientError):
    """The token endpoint could not be reached or gave no usable answer."""

    code = "endpoint_unavailable"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BusyError(TransientError):
    """A refresh of this profile is already in flight."""

    code = "busy"


class KeyringUnavailableError(TransientError):
    """The OS keyring that holds the state key is locked, not running, or not answering."""


class NoTokenYetError(TransientError):
    """No valid access token now, while the daemon retries on its own."""

    code = "no_token_yet"


class RateLimitedError(TransientError):
    """The control socket refused a request: too many at once from its clients."""

    code = "rate_limited"


class AlertError(AacTokendError):
    """Stop and alert: the chain needs a person."""

    code = "alert"
    exit_code = 69  # EX_UNAVAILABLE


class NoTokenError(AlertError):
    """No valid access token, and none will come without a person (the message says why)."""

    code = "no_token"


class StateCorruptError(AlertError):
    """A state file exists but cannot be decrypted or parsed; it is never overwritten."""

    code = "corrupt_state"


class StorageError(AlertError):
    """The state could not be made durable (disk full, I/O error, read-only directory)."""

    code = "storage_error"


class InputError(AacTokendError):
    """Fix the input, then try again."""

    code = "bad_request"
    exit_code = 65  # EX_DATAERR


class UsageError(InputError):
    """Command-line options that do not go together (what argparse cannot check)."""

    exit_code = 2  # argparse's own status for a usage error


class TokenFormatError(InputError):
    """A token that is not what it should be; the message says which part."""


class EndpointNotAllowedError(InputError):
    """A token endpoint that aac-tokend will not send a refresh token to."""


class ConfigError(InputError):
    """A bad configuration key or value; the message names the key and the file."""

    code = "config_error"
    exit_code = 78  # EX_CONFIG


class ProfileError(InputError):
    """An unknown profile, or a profile name that cannot be used."""

    code = "unknown_profile"


class TokenHeldError(InputError):
    """An import of a refresh token that another profile holds (a chain has one owner)."""


class TokenSpentError(InputError):
    """An import of a refresh token that a profile has already sent to the token endpoint."""


class HolderUnknownError(InputError):
    """An import while a state file cannot be read: its refresh token may be this one."""


class ChainInUseError(InputError):
    """A ``--legacy`` import into a profile whose live OAuth chain it would delete."""

    code = "chain_in_use"


class RequestTooLargeError(InputError):
    """The control socket refused a request over its size limit."""

    code = "request_too_large"


class AlreadyRunningError(InputError):
    """Another daemon holds the single-owner lock."""

    exit_code = 3

    def __init__(self, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"already running ({who}); stop it first or use its control socket")
        self.pid = pid


class DaemonNotRunningError(InputError):
    """The command needs the daemon, and none is running."""

    exit_code = 4


# -- fleet mode (aac_tokend/fleet/): etcd, the fleet key, rollbacks ----------------------------
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

    def __init__(self, message: str, *, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class FenceLostError(TransientError):
    """A fleet transaction's compare failed: this host no longer owns the profile's chain, or
    the chain moved on since it was read. Nothing was written; the caller reads again."""


class EtcdAuthError(AlertError):
    """etcd refused our credentials or their permissions: a person has to fix them."""


class EtcdRequestError(InputError):
    """etcd refused the request itself (its gRPC code kept for the caller as ``grpc_code``)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.grpc_code = code  # None: etcd gave none


class FleetKeyFormatError(InputError):
    """A pasted fleet key that is not an export of one (mistyped, truncated, something else)."""


class RollbackError(AlertError):
    """etcd offered a generation older than one this host has seen: it is not used."""


def _tree(cls: type[AacTokendError]) -> list[type[AacTokendError]]:
    """``cls`` and every class below it in this module, parents before children."""
    below = [sub for sub in cls.__subclasses__() if sub.__module__ == __name__]
    return [cls, *(each for sub in below for each in _tree(sub))]


def from_wire(code: str, message: str) -> AacTokendError:
    """The exception a control-socket refusal ``(code, message)`` stands for: an instance of
    the class that defines ``code``, or of AacTokendError for a code no class has (such as
    the server's own ``unknown_op`` or ``internal_error``), exit 1."""
    for cls in _tree(AacTokendError):
        if cls.__dict__.get("code") == code:
            return cls(message)
    return AacTokendError(message)

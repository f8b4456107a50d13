"""The one exception tree of aac-tokend, split by what the caller does next.

    AacTokendError
    ├── TransientError              retry later: the chain is fine, the world is not
    │   ├── EndpointUnavailableError    network, TLS, timeout, 408/429/5xx, a garbled answer
    │   ├── BusyError                   a refresh of this profile is already in flight
    │   └── KeyringUnavailableError     the OS keyring holding the state key is locked or absent
    ├── AlertError                  stop and alert: a person has to act
    │   ├── RefreshRejectedError        the token endpoint refused the refresh (OAuth error)
    │   ├── StateCorruptError           a state file cannot be read back; it is left untouched
    │   └── StorageError                the state could not be written durably
    └── InputError                  fix the input, then try again
        ├── TokenFormatError            not a JWT, or a JWT without what we need
        ├── EndpointNotAllowedError     a token endpoint we refuse to send a refresh token to
        ├── ConfigError                 config.toml has an unknown key or a bad value
        ├── ProfileError                unknown profile, or a bad profile name
        ├── TokenHeldError              another profile holds this refresh token
        ├── TokenSpentError             this refresh token was already sent (it is spent)
        ├── HolderUnknownError          a state file cannot be read: who holds what is unknown
        ├── ChainInUseError             a static token would replace a live chain (needs --yes)
        ├── AlreadyRunningError         another daemon owns the state (pid known)
        └── DaemonNotRunningError       the command needs a running daemon

Every message is one line, names what was wrong and what to do, and never contains a token.
Lower-layer exceptions (requests, OSError, cryptography) are translated where they occur,
with ``raise ... from``.
"""

from __future__ import annotations

__all__ = [
    "CONTROL_REFUSALS",
    "AacTokendError",
    "AlertError",
    "AlreadyRunningError",
    "BusyError",
    "ChainInUseError",
    "ConfigError",
    "DaemonNotRunningError",
    "EndpointNotAllowedError",
    "EndpointUnavailableError",
    "HolderUnknownError",
    "InputError",
    "KeyringUnavailableError",
    "ProfileError",
    "RefreshRejectedError",
    "StateCorruptError",
    "StorageError",
    "TokenFormatError",
    "TokenHeldError",
    "TokenSpentError",
    "TransientError",
    "control_refusal",
]


class AacTokendError(Exception):
    """Root of every error aac-tokend raises on purpose."""

    #: exit status of the CLI when this error ends a command
    exit_code = 1


class TransientError(AacTokendError):
    """Retry later: nothing is wrong with the chain itself."""

    exit_code = 75  # EX_TEMPFAIL


class EndpointUnavailableError(TransientError):
    """The token endpoint could not be reached or gave no usable answer."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BusyError(TransientError):
    """A refresh of this profile is already in flight."""


class KeyringUnavailableError(TransientError):
    """The OS keyring that holds the state key is locked, not running, or not answering."""


class AlertError(AacTokendError):
    """Stop and alert: the chain needs a person."""

    exit_code = 69  # EX_UNAVAILABLE


class RefreshRejectedError(AlertError):
    """The token endpoint rejected the refresh with an OAuth error."""

    def __init__(self, message: str, *, error: str, error_description: str | None) -> None:
        super().__init__(message)
        self.error = error
        self.error_description = error_description


class StateCorruptError(AlertError):
    """A state file exists but cannot be decrypted or parsed; it is never overwritten."""


class StorageError(AlertError):
    """The state could not be made durable (disk full, I/O error, read-only directory)."""


class InputError(AacTokendError):
    """Fix the input, then try again."""

    exit_code = 65  # EX_DATAERR


class TokenFormatError(InputError):
    """A token that is not what it should be; the message says which part."""


class EndpointNotAllowedError(InputError):
    """A token endpoint that aac-tokend will not send a refresh token to."""


class ConfigError(InputError):
    """A bad configuration key or value; the message names the key and the file."""

    exit_code = 78  # EX_CONFIG


class ProfileError(InputError):
    """An unknown profile, or a profile name that cannot be used."""


class TokenHeldError(InputError):
    """An import of a refresh token that another profile holds (a chain has one owner)."""


class TokenSpentError(InputError):
    """An import of a refresh token that a profile has already sent to the token endpoint."""


class HolderUnknownError(InputError):
    """An import while a state file cannot be read: its refresh token may be this one."""


class ChainInUseError(InputError):
    """A ``--legacy`` import into a profile whose live OAuth chain it would delete."""


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


#: The exception for each code a control-socket refusal carries; its exit_code is the exit
#: status of the CLI (``token``, ``exec``, ``api``) and what a Python caller catches, so the
#: two cannot drift apart. A code not listed is an AacTokendError (exit 1).
CONTROL_REFUSALS: dict[str, type[AacTokendError]] = {
    "no_token": AlertError,
    "no_token_yet": TransientError,
    "unknown_profile": ProfileError,
    "bad_request": InputError,
    "config_error": ConfigError,
    "busy": BusyError,
    "storage_error": StorageError,
    "corrupt_state": StateCorruptError,
    "transient": TransientError,
    "endpoint_unavailable": EndpointUnavailableError,
    "alert": AlertError,
    "refresh_rejected": AlertError,  # the OAuth error itself stays in the daemon's message
    "chain_in_use": ChainInUseError,
}


def control_refusal(code: str, message: str) -> AacTokendError:
    """The exception for a control reply refused with ``code`` (see CONTROL_REFUSALS)."""
    return CONTROL_REFUSALS.get(code, AacTokendError)(message)

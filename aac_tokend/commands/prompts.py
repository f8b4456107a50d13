"""What the commands ask a person at a terminal (tokens, a lifetime, a confirmation).

Nothing asked here is ever echoed back in an error: a token pasted at the wrong prompt
stays unprinted.
"""

from __future__ import annotations

import getpass
import math
import sys
from collections.abc import Callable

from ..errors import AacTokendError, InputError

__all__ = ["ask_refresh_lifetime", "confirm_remove", "confirm_replace_chain", "read_tokens"]


def read_tokens(legacy: bool) -> str:
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        raise InputError(
            "import: standard input is closed; pipe the tokens in, or run import at a terminal"
        )
    if sys.stdin.isatty():
        access = getpass.getpass("Access token (input hidden): ")
        if legacy:
            return access
        return access + "\n" + getpass.getpass("Refresh token (input hidden): ")
    # Bytes, whatever the locale: a stray non-UTF-8 byte becomes U+FFFD, which clean_token
    # refuses in one line naming the token, instead of a decoding traceback.
    return sys.stdin.buffer.read(64 * 1024 + 1).decode("utf-8", errors="replace")


def ask_refresh_lifetime(read: Callable[[str], str]) -> float | None:
    """Ask a person at a terminal for the refresh token's lifetime; Enter means unknown.

    Without it an invalid_grant cannot tell the token's natural end from a reuse. The answer
    is never echoed back in an error: a token pasted here by mistake stays unprinted.
    """
    answer = read(
        "Refresh token lifetime in days, as chosen when generating it in AAC (Enter if unknown): "
    ).strip()
    if not answer:
        return None
    try:
        days = float(answer)
    except ValueError:
        days = math.nan
    if not math.isfinite(days) or days <= 0:
        raise InputError(
            "import: the refresh token lifetime must be a number of days (1-365); run import "
            "again and press Enter if you do not know it"
        )
    return days


def _yes(question: str) -> bool:
    """Ask ``question`` on stderr; True only for an answer of y or yes."""
    sys.stderr.write(question + " [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def confirm_replace_chain(name: str) -> None:
    """Ask on a terminal before a static token replaces a live chain's refresh token."""
    if not _yes(
        f"Profile {name!r} holds a live OAuth chain; replace it with this static token? Its "
        "refresh token is deleted for good (this may be the only copy)."
    ):
        raise InputError(f"import: not confirmed; profile {name} was kept")


def confirm_remove(name: str, yes: bool) -> None:
    """Ask on a terminal before deleting what may be the only copy of a refresh token."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise InputError(
            f"remove: refusing to delete profile {name!r} without confirmation (its refresh "
            "token cannot be recovered); pass --yes"
        )
    if not _yes(
        f"Remove profile {name!r}? Its refresh token is deleted for good (this may be the "
        "only copy)."
    ):
        # exit 1, as before the error map (import's refusal is 65): kept, not aligned
        raise AacTokendError(f"remove: not confirmed; profile {name} was kept")

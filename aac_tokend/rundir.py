"""The runtime directory, found with ``os`` and ``stat`` alone: the `token` fast path.

Kept apart from paths.py, whose dataclasses and pathlib imports (which pull in inspect and
re) cost about 15 ms, most of a bare interpreter's start, on every `aac-tokend token`
(measured by ``python -m tests.bench``). paths.py re-exports everything here.
"""

from __future__ import annotations

import os
import stat
import sys

# Not `from typing import TYPE_CHECKING`: importing typing alone costs milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "APP_NAME",
    "HOME_ENV",
    "PROFILE_ENV",
    "absolute",
    "is_profile_name",
    "runtime_dir_fast",
    "token_socket_name",
]

APP_NAME = "aac-tokend"
HOME_ENV = "AAC_TOKEND_HOME"
#: The profile a command uses when given no --profile (the fast `token` path reads it too).
PROFILE_ENV = "AAC_TOKEND_PROFILE"


_NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_REST = _NAME_FIRST | frozenset("_.-")


def is_profile_name(name: str) -> bool:
    """True if ``name`` is a name a profile can have: ``state.validate_profile_name``'s rule
    without ``re`` (several ms on the fast path); tests/test_cli_contract.py pins the two."""
    return (
        0 < len(name) <= 64
        and name[0] in _NAME_FIRST
        and set(name) <= _NAME_REST
        and not name.endswith((".lock", ".state", ".tmp"))
    )


def token_socket_name(profile: str) -> str:
    """The file name of ``profile``'s token socket in the runtime directory: the one place
    it is spelt (the daemon serves it, the fast path and ``get_token`` read it).

    A name no profile can have (``../evil``) is refused here (ProfileError, 65), so that no
    reader follows it out of the runtime directory to a socket the daemon never made."""
    if not is_profile_name(profile):
        from .core.state import validate_profile_name

        validate_profile_name(profile)  # raises, with the one wording of the rule
        raise AssertionError(f"rundir.is_profile_name and state disagree on {profile!r}")
    return f"{profile}.token.sock"


def _normalise(path: str) -> str:
    """``str(PurePosixPath(path))``: repeated slashes, "." parts and a trailing "/" dropped."""
    root = "/" if path.startswith("/") else ""
    if path.startswith("//") and not path.startswith("///"):
        root = "//"  # POSIX leaves a leading double slash implementation-defined; so does Path
    parts = [part for part in path.split("/") if part and part != "."]
    return root + "/".join(parts) or "."


def absolute(path: str) -> str:
    """``str(Path(path).expanduser().absolute())``, without importing pathlib."""
    path = os.path.expanduser(_normalise(path))
    if not path.startswith("/"):
        path = os.getcwd() + "/" + path
    return _normalise(path)


def runtime_dir_fast(env: Mapping[str, str] = os.environ) -> str | None:
    """The runtime dir without importing platformdirs (25 ms), where that is exact.

    Mirrors ``resolve_paths`` for AAC_TOKEND_HOME, and platformdirs for Linux with a sound
    XDG_RUNTIME_DIR; a test pins the mirror to platformdirs. None means: ask platformdirs.
    """
    home = env.get(HOME_ENV)
    if home:
        if home.startswith("~") and os.path.expanduser(home) == home:
            return None  # ~nosuchuser/...: resolve_paths names it
        return os.path.join(absolute(home), "run")
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if sys.platform.startswith("linux") and os.path.isabs(xdg) and _sound_runtime_dir(xdg):
        return os.path.join(xdg, APP_NAME)
    return None


def _sound_runtime_dir(path: str) -> bool:
    """True where platformdirs surely accepts ``path`` as the runtime directory.

    Its checks, mirrored: our own 0700 real directory, no parent writable by all without
    the sticky bit, and below a sticky shared one only root's or our own directories.
    Where a check cannot be made, platformdirs is asked instead.
    """
    euid = os.geteuid()
    path = _normalise(path)  # drops a trailing "/", which would make lstat follow a symlink
    parents = []  # "/a/b/c" -> "/a/b", "/a", "/": Path(path).parents
    current = path
    while (parent := os.path.dirname(current)) != current:
        parents.append(parent)
        current = parent
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != euid or info.st_mode & 0o777 != 0o700:
            return False
        shared = False
        for parent in reversed(parents):
            if shared and os.lstat(parent).st_uid not in (0, euid):
                return False
            mode = os.stat(parent).st_mode
            shared = bool(mode & stat.S_IWOTH)
            if shared and not mode & stat.S_ISVTX:
                return False
    except OSError:
        return False
    return True

"""Where aac-tokend keeps things: config, state and runtime directories.

Locations come from platformdirs (appname ``aac-tokend``); ``AAC_TOKEND_HOME=DIR`` puts all
three under DIR, for tests and for running several isolated instances.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["APP_NAME", "HOME_ENV", "Paths", "resolve_paths", "runtime_dir_fast"]

APP_NAME = "aac-tokend"
HOME_ENV = "AAC_TOKEND_HOME"


@dataclass(frozen=True)
class Paths:
    """The directories and well-known files of one aac-tokend instance."""

    config_dir: Path
    state_dir: Path
    runtime_dir: Path

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def key_file(self) -> Path:
        return self.config_dir / "state.key"

    @property
    def daemon_lock(self) -> Path:
        return self.state_dir / "daemon.lock"

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    def token_socket(self, profile: str) -> Path:
        return self.runtime_dir / f"{profile}.token.sock"


def runtime_dir_fast(env: Mapping[str, str] = os.environ) -> str | None:
    """The runtime dir without importing platformdirs (25 ms), where that is exact.

    Mirrors ``resolve_paths`` for AAC_TOKEND_HOME, and platformdirs for Linux with a sound
    XDG_RUNTIME_DIR; a test pins the mirror to platformdirs. None means: ask platformdirs.
    """
    home = env.get(HOME_ENV)
    if home:
        return str(Path(home).expanduser().absolute() / "run")
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
    try:
        info = os.lstat(Path(path))  # Path drops a trailing "/", which would follow a symlink
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != euid or info.st_mode & 0o777 != 0o700:
            return False
        shared = False
        for parent in reversed(Path(path).parents):
            if shared and os.lstat(parent).st_uid not in (0, euid):
                return False
            mode = os.stat(parent).st_mode
            shared = bool(mode & stat.S_IWOTH)
            if shared and not mode & stat.S_ISVTX:
                return False
    except OSError:
        return False
    return True


def resolve_paths(env: Mapping[str, str] = os.environ) -> Paths:
    """The instance's paths, from AAC_TOKEND_HOME or the platform's conventions."""
    home = env.get(HOME_ENV)
    if home:
        root = Path(home).expanduser().absolute()
        return Paths(root / "config", root / "state", root / "run")
    import platformdirs

    fast = runtime_dir_fast(env)
    return Paths(
        Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)),
        Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)),
        Path(fast) if fast else Path(platformdirs.user_runtime_dir(APP_NAME, appauthor=False)),
    )

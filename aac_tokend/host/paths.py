"""Where aac-tokend keeps things: config, state and runtime directories.

Locations come from platformdirs (appname ``aac-tokend``); ``AAC_TOKEND_HOME=DIR`` puts all
three under DIR, for tests and for running several isolated instances.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Apart, so that `aac-tokend token` finds its socket without this module's imports.
from ..rundir import APP_NAME, HOME_ENV, absolute, runtime_dir_fast, token_socket_name

__all__ = [
    "APP_NAME",
    "HOME_ENV",
    "Paths",
    "check_token_socket",
    "resolve_paths",
    "runtime_dir_fast",
]


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
        # A dot first: no profile name starts with one, so no profile lock (<profile>.lock)
        # can be this file, in any case.
        return self.state_dir / ".owner.lock"

    @property
    def legacy_daemon_lock(self) -> Path:
        """The single-owner lock of 0.1.0, which a ``daemon`` profile's lock now may be."""
        return self.state_dir / "daemon.lock"

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    @property
    def pending_dir(self) -> Path:
        """Token pairs the state disk refused (pending.py): the runtime dir's file system."""
        return self.runtime_dir / "pending"

    def token_socket(self, profile: str) -> Path:
        return self.runtime_dir / token_socket_name(profile)


def check_token_socket(profile: str, path: Path) -> None:
    """InputError if ``profile``'s token socket ``path`` is too long to bind (checked at import)."""
    from ..errors import InputError
    from ..serve.unixsock import UNIX_PATH_MAX

    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX - 1:
        raise InputError(
            f"profile {profile}: its token socket {path} would be {size} bytes, over the "
            f"{UNIX_PATH_MAX - 1}-byte limit of Unix sockets; choose a shorter profile name "
            "or set AAC_TOKEND_HOME to a shorter directory"
        )


def _check_home(root: Path) -> None:
    """$AAC_TOKEND_HOME is created when missing; something else in its way is named here,
    before a command fails on a path inside it with a bare "Not a directory"."""
    from ..errors import InputError

    for place in (root, *root.parents):
        if os.path.lexists(place):
            if not place.is_dir():
                raise InputError(
                    f"{HOME_ENV}={root} cannot be used: {place} is not a directory; point "
                    f"{HOME_ENV} at a directory (it is created if missing) or unset it"
                )
            return


def resolve_paths(env: Mapping[str, str] = os.environ) -> Paths:
    """The instance's paths, from AAC_TOKEND_HOME or the platform's conventions."""
    home = env.get(HOME_ENV)
    if home:
        # rundir's expansion, which the fast path uses: Path.expanduser would raise a bare
        # RuntimeError for ~nosuchuser, which os.path.expanduser leaves as it is.
        if home.startswith("~") and os.path.expanduser(home) == home:
            from ..errors import InputError

            user = home[1:].split("/", 1)[0]
            raise InputError(
                f"{HOME_ENV}={home[:200]!r} cannot be used: there is no user {user[:64]!r} "
                f"to expand ~{user[:64]} for; give {HOME_ENV} an absolute path or unset it"
            )
        root = Path(absolute(home))
        _check_home(root)
        return Paths(root / "config", root / "state", root / "run")
    import warnings

    import platformdirs

    fast = runtime_dir_fast(env)
    with warnings.catch_warnings():
        # Without XDG_RUNTIME_DIR platformdirs warns on every call and falls back to a
        # private /tmp directory, which is fine for us: every command would print it.
        warnings.simplefilter("ignore")
        runtime = fast or platformdirs.user_runtime_dir(APP_NAME, appauthor=False)
    return Paths(
        Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)),
        Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)),
        Path(runtime),
    )

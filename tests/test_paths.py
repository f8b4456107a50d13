"""Where things live: AAC_TOKEND_HOME layout, and the fast runtime dir pinned to platformdirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aac_tokend.core.state import validate_profile_name
from aac_tokend.errors import ProfileError
from aac_tokend.host.paths import APP_NAME, HOME_ENV, Paths, resolve_paths, runtime_dir_fast
from aac_tokend.store.files import FileStore
from aac_tokend.store.pending import PendingStore

# Generous bound for one short python subprocess; only a hang detector.
SUBPROCESS_TIMEOUT = 30.0

# Run in a subprocess with a prepared environment: platformdirs reads os.environ itself.
COMPARE = textwrap.dedent(
    """
    import json, os, warnings
    warnings.simplefilter("ignore")  # platformdirs warns when it rejects XDG_RUNTIME_DIR
    import platformdirs
    from aac_tokend.host.paths import runtime_dir_fast, resolve_paths
    print(json.dumps({
        "fast": runtime_dir_fast(os.environ),
        "platformdirs": platformdirs.user_runtime_dir("aac-tokend", appauthor=False),
        "resolved": str(resolve_paths(os.environ).runtime_dir),
    }))
    """
)


class TestHomeLayout:
    """AAC_TOKEND_HOME=DIR puts config, state and run under DIR."""

    def test_layout(self, tmp_path: Path) -> None:
        """Config, state, runtime dirs and the well-known files sit where documented."""
        paths = resolve_paths({HOME_ENV: str(tmp_path)})
        assert paths == Paths(tmp_path / "config", tmp_path / "state", tmp_path / "run")
        assert paths.config_file == tmp_path / "config" / "config.toml"
        assert paths.key_file == tmp_path / "config" / "state.key"
        assert paths.daemon_lock == tmp_path / "state" / ".owner.lock"
        assert paths.control_socket == tmp_path / "run" / "control.sock"
        assert paths.token_socket("work") == tmp_path / "run" / "work.token.sock"

    def test_nothing_created(self, tmp_path: Path) -> None:
        """Resolving paths creates no directories."""
        resolve_paths({HOME_ENV: str(tmp_path / "home")})
        assert not (tmp_path / "home").exists()

    @pytest.mark.parametrize("home", ["~/atk-home", "rel/atk", "./x/../y"])
    def test_relative_and_tilde_made_absolute(self, home: str) -> None:
        """A relative or ~ home is made absolute, and the fast runtime dir agrees with it."""
        paths = resolve_paths({HOME_ENV: home})
        assert paths.runtime_dir.is_absolute()
        assert "~" not in str(paths.runtime_dir)
        assert runtime_dir_fast({HOME_ENV: home}) == str(paths.runtime_dir)

    def test_fast_with_home(self, tmp_path: Path) -> None:
        """With AAC_TOKEND_HOME the fast runtime dir is DIR/run, whatever XDG says."""
        env = {HOME_ENV: str(tmp_path), "XDG_RUNTIME_DIR": "/run/user/12345"}
        assert runtime_dir_fast(env) == str(tmp_path / "run")

    def test_empty_home_ignored(self) -> None:
        """An empty AAC_TOKEND_HOME counts as unset."""
        assert runtime_dir_fast({HOME_ENV: "", "XDG_RUNTIME_DIR": "relative"}) is None


def compare(env_changes: dict[str, str | None]) -> dict[str, str | None]:
    """Ask a subprocess, with ``env_changes`` applied, for the fast and platformdirs answers."""
    env = dict(os.environ)
    env.pop(HOME_ENV, None)
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    result = subprocess.run(
        [sys.executable, "-c", COMPARE],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=True,
    )
    answer: dict[str, str | None] = json.loads(result.stdout)
    return answer


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fast path is Linux-only")
class TestRuntimeDirMirrorsPlatformdirs:
    """runtime_dir_fast equals platformdirs' answer whenever it gives one."""

    @pytest.fixture
    def runtime(self, tmp_path: Path) -> Path:
        """A proper XDG runtime dir: ours, a real directory, mode 0700."""
        directory = tmp_path / "xdg"
        directory.mkdir()
        os.chmod(directory, 0o700)
        os.chmod(tmp_path, 0o755)  # noqa: S103 - parents as on a real system
        return directory

    def test_sound_xdg(self, runtime: Path) -> None:
        """A 0700 XDG_RUNTIME_DIR of ours: the fast answer is exact and not None."""
        answer = compare({"XDG_RUNTIME_DIR": str(runtime)})
        assert answer["fast"] == str(runtime / APP_NAME)
        assert answer["fast"] == answer["platformdirs"] == answer["resolved"]

    def test_trailing_slash(self, runtime: Path) -> None:
        """A trailing slash gives the same string platformdirs gives."""
        answer = compare({"XDG_RUNTIME_DIR": str(runtime) + "/"})
        assert answer["fast"] is not None
        assert answer["fast"] == answer["platformdirs"]

    def test_real_session_dir(self) -> None:
        """The environment's own XDG_RUNTIME_DIR (if any) is mirrored exactly."""
        answer = compare({})
        assert answer["fast"] is None or answer["fast"] == answer["platformdirs"]
        assert answer["resolved"] == (answer["fast"] or answer["platformdirs"])

    @pytest.mark.parametrize(
        "make",
        [
            lambda d: d.chmod(0o755),
            lambda d: d.chmod(0o711),
            lambda d: d.rmdir(),
        ],
        ids=["mode 0755", "mode 0711", "missing"],
    )
    def test_unsound_dir_defers(self, runtime: Path, make: Callable[[Path], object]) -> None:
        """An XDG dir platformdirs may reject (loose mode, missing) is not guessed: None."""
        make(runtime)
        answer = compare({"XDG_RUNTIME_DIR": str(runtime)})
        assert answer["fast"] is None
        assert answer["resolved"] == answer["platformdirs"]

    def test_symlink_defers(self, runtime: Path, tmp_path: Path) -> None:
        """A symlinked XDG dir is not guessed: None, and resolve_paths follows platformdirs."""
        link = tmp_path / "link"
        link.symlink_to(runtime)
        answer = compare({"XDG_RUNTIME_DIR": str(link)})
        assert answer["fast"] is None
        assert answer["resolved"] == answer["platformdirs"]

    def test_world_writable_parent_defers(self, tmp_path: Path) -> None:
        """Below a directory anyone may write to, the answer is left to platformdirs."""
        shared = tmp_path / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)  # noqa: S103 - the unsafe parent under test
        runtime = shared / "xdg"
        runtime.mkdir()
        os.chmod(runtime, 0o700)
        answer = compare({"XDG_RUNTIME_DIR": str(runtime)})
        assert answer["fast"] is None
        assert answer["resolved"] == answer["platformdirs"]

    def test_sticky_shared_parent_of_ours_is_exact(self, tmp_path: Path) -> None:
        """Below a sticky shared directory (like /tmp), our own directories are mirrored."""
        shared = tmp_path / "sticky"
        shared.mkdir()
        os.chmod(shared, 0o1777)  # noqa: S103 - a /tmp-like parent
        runtime = shared / "xdg"
        runtime.mkdir()
        os.chmod(runtime, 0o700)
        answer = compare({"XDG_RUNTIME_DIR": str(runtime)})
        assert answer["fast"] == str(runtime / APP_NAME) == answer["platformdirs"]

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another user")
    def test_stranger_below_sticky_parent_defers(self, tmp_path: Path) -> None:
        """Below a sticky shared directory, a directory of another user is not trusted."""
        shared = tmp_path / "sticky"
        shared.mkdir()
        os.chmod(shared, 0o1777)  # noqa: S103 - a /tmp-like parent
        stranger = shared / "stranger"
        stranger.mkdir()
        runtime = stranger / "xdg"
        runtime.mkdir()
        os.chmod(runtime, 0o700)
        os.chown(stranger, 54321, 54321)
        answer = compare({"XDG_RUNTIME_DIR": str(runtime)})
        assert answer["fast"] is None
        assert answer["resolved"] == answer["platformdirs"] != str(runtime / APP_NAME)

    @pytest.mark.parametrize("value", ["relative/dir", " /run/user/0", "", None])
    def test_unusable_value_defers(self, value: str | None) -> None:
        """An unset, empty, relative or space-prefixed XDG_RUNTIME_DIR is left to platformdirs."""
        answer = compare({"XDG_RUNTIME_DIR": value})
        assert answer["fast"] is None
        assert answer["resolved"] == answer["platformdirs"]


class TestProfileFilesNeverCollide:
    """No profile name gives a file that is one of the daemon's own (issue 11, item 5)."""

    @staticmethod
    def _daemon_files(paths: Paths) -> set[str]:
        own = [paths.daemon_lock, paths.control_socket, paths.key_file, paths.config_file]
        return {str(p).lower() for p in [*own, paths.pending_dir]}

    @staticmethod
    def _profile_files(paths: Paths, name: str) -> set[str]:
        store = FileStore(paths.state_dir, bytes(32))
        files = [
            store.path(name),
            paths.state_dir / f"{name}.lock",  # FileStore.locked
            paths.token_socket(name),
            PendingStore(paths.pending_dir).path(name),
        ]
        return {str(p).lower() for p in files}  # macOS file systems ignore case

    @pytest.fixture
    def paths(self, tmp_path: Path) -> Paths:
        return resolve_paths({HOME_ENV: str(tmp_path)})

    def test_no_daemon_file_reads_back_as_a_profile_name(self, paths: Paths) -> None:
        """Each daemon file, read back as a profile file, gives a name the importer refuses."""
        suffixes = {
            paths.state_dir: (".state", ".lock"),
            paths.runtime_dir: (".token.sock",),
            paths.pending_dir: (".pending",),
        }
        colliding = []
        for own in self._daemon_files(paths):
            path = Path(own)
            for suffix in suffixes.get(path.parent, ()):
                if path.name.endswith(suffix):
                    colliding.append(path.name[: -len(suffix)])
        assert colliding == [".owner"]
        for name in colliding:
            with pytest.raises(ProfileError, match="starting with a letter or digit"):
                validate_profile_name(name)
        for name in ("daemon", "Daemon", "DAEMON"):  # 0.1.0's lock name: a profile's now
            assert validate_profile_name(name) == name

    @settings(
        max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True))
    def test_accepted_names_never_share_a_daemon_file(self, tmp_path: Path, name: str) -> None:
        """Any name validate_profile_name accepts has files apart from the daemon's."""
        paths = resolve_paths({HOME_ENV: str(tmp_path)})
        try:
            validate_profile_name(name)
        except ProfileError:
            return
        assert not self._profile_files(paths, name) & self._daemon_files(paths)

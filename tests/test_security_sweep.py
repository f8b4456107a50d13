"""A security sweep of a real daemon's footprint: permissions and ownership of everything under
AAC_TOKEND_HOME, core dumps off, planted symlinks refused, plain http refused off loopback.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers_e2e import (
    E2EHome,
    RecordingSandbox,
    e2e_home,
    import_pair,
    running_sandbox,
)

#: What a planted symlink points at; it must read exactly this afterwards.
BAIT = b"not yours to touch\n"


@pytest.fixture
def home() -> Iterator[E2EHome]:
    with e2e_home() as instance:
        yield instance


@pytest.fixture
def sandbox() -> Iterator[RecordingSandbox]:
    with running_sandbox() as server:
        yield server


def _bait(home: E2EHome, name: str) -> Path:
    """A file outside AAC_TOKEND_HOME that a followed symlink would damage."""
    target = home.root / name
    target.write_bytes(BAIT)
    return target


def _one_line_error(result: object, stderr: str, returncode: int) -> None:
    lines = stderr.splitlines()
    assert returncode != 0, str(result)
    assert len(lines) == 1 and lines[0].startswith("aac-tokend: error: "), str(result)


class TestFootprint:
    """What a running daemon leaves on disk and in its process limits."""

    def test_tree_is_private_and_core_dumps_are_off(
        self, home: E2EHome, sandbox: RecordingSandbox
    ) -> None:
        """After import and a refresh every directory is 0700, every file and socket 0600 or
        stricter, all ours, no symlinks; the daemon runs with a core-file limit of 0 0."""
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        answer = daemon.control("refresh", profile="default")
        assert answer["ok"], answer

        uid = os.getuid()
        seen = {"dir": 0, "file": 0, "socket": 0}
        for root, dirs, files in os.walk(home.home):
            for name in [*dirs, *files]:
                path = Path(root) / name
                info = os.lstat(path)
                mode = stat.S_IMODE(info.st_mode)
                assert not stat.S_ISLNK(info.st_mode), f"{path} is a symlink"
                assert info.st_uid == uid, f"{path} is owned by uid {info.st_uid}"
                if stat.S_ISDIR(info.st_mode):
                    seen["dir"] += 1
                    assert mode == 0o700, f"{path} is {mode:o}"
                elif stat.S_ISREG(info.st_mode) or stat.S_ISSOCK(info.st_mode):
                    seen["socket" if stat.S_ISSOCK(info.st_mode) else "file"] += 1
                    assert mode & ~0o600 == 0, f"{path} is {mode:o}"
                else:
                    raise AssertionError(f"{path} is neither file, directory nor socket")
        top = os.lstat(home.home)
        assert stat.S_IMODE(top.st_mode) == 0o700 and top.st_uid == uid
        assert seen["file"] >= 2 and seen["socket"] >= 2, seen  # key + state; control + token

        limits = Path(f"/proc/{daemon.pid}/limits").read_text().splitlines()
        core = [line for line in limits if line.startswith("Max core file size")]
        assert core and core[0].split()[4:6] == ["0", "0"], core


class TestPlantedSymlinks:
    """A symlink planted where aac-tokend writes is refused and its target left alone."""

    def test_import_does_not_follow_a_symlinked_state_file(
        self, home: E2EHome, sandbox: RecordingSandbox
    ) -> None:
        """A state path that is a symlink to a file outside makes import fail in one line
        and leaves the target untouched."""
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        target = _bait(home, "state-target")
        home.state_file("second").symlink_to(target)
        pair = sandbox.generate()
        result = home.cli(
            "import", "--profile", "second", "--token-endpoint", sandbox.token_endpoint,
            "--base-url", sandbox.api_url, input=str(pair["access_token"]) + "\n"
            + str(pair["refresh_token"]) + "\n",
        )  # fmt: skip
        _one_line_error(result, result.stderr, result.returncode)
        assert target.read_bytes() == BAIT
        assert home.state_file("second").is_symlink()
        assert daemon.alive and daemon.status()["ok"]

    def test_daemon_start_refuses_a_symlinked_token_socket(
        self, home: E2EHome, sandbox: RecordingSandbox
    ) -> None:
        """A symlink at a profile's token-socket path is refused at start with a one-line
        error; that profile has no socket (status says why), the daemon serves on, and the
        symlink and its target are left as they were (one bad profile never stops it)."""
        import_pair(home, sandbox)
        home.paths.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = _bait(home, "socket-target")
        home.socket("default").symlink_to(target)
        daemon = home.daemon().start()
        errors = [line for line in daemon.output().splitlines() if "error" in line]
        assert any("default.token.sock" in line for line in errors), daemon.output()
        row = daemon.profile_status("default")
        assert row["token_socket"] is None and "no token socket" in row["alert"], row
        assert target.read_bytes() == BAIT
        assert home.socket("default").is_symlink()
        assert daemon.alive

    def test_profile_add_refuses_a_symlinked_token_socket(
        self, home: E2EHome, sandbox: RecordingSandbox
    ) -> None:
        """Importing a profile whose token-socket path is a planted symlink serves nothing
        there, leaves the target intact, and the daemon keeps running."""
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        target = _bait(home, "socket-target")
        home.socket("added").symlink_to(target)
        pair = sandbox.generate()
        home.cli(
            "import", "--profile", "added", "--token-endpoint", sandbox.token_endpoint,
            "--base-url", sandbox.api_url, input=str(pair["access_token"]) + "\n"
            + str(pair["refresh_token"]) + "\n",
        )  # fmt: skip
        assert target.read_bytes() == BAIT
        assert home.socket("added").is_symlink()
        assert daemon.token("added") == ""
        assert daemon.alive and daemon.status()["ok"]


class TestPlainHttp:
    """A refresh token is never sent in clear text off the machine."""

    def test_import_refuses_plain_http_to_a_remote_host(
        self, home: E2EHome, sandbox: RecordingSandbox
    ) -> None:
        """--token-endpoint http://<non-loopback host> makes import exit 65 in one line."""
        pair = sandbox.generate()
        result = home.cli(
            "import", "--token-endpoint", "http://auth.example.com/as/token",
            "--base-url", sandbox.api_url, input=str(pair["access_token"]) + "\n"
            + str(pair["refresh_token"]) + "\n",
        )  # fmt: skip
        _one_line_error(result, result.stderr, result.returncode)
        assert result.returncode == 65, str(result)
        assert not home.state_file("default").exists()

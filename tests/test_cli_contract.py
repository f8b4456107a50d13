"""The command line's contract at its edges: bad names, bad answers, slow or vanishing daemons.

Each class answers one finding of an outside review. The daemons here are small honest
classes listening on real Unix sockets, and the commands run as real processes.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aac_tokend.api import get_token
from aac_tokend.core.state import validate_profile_name
from aac_tokend.errors import ProfileError
from aac_tokend.host.paths import resolve_paths
from aac_tokend.rundir import is_profile_name, token_socket_name
from tests.helpers_e2e import E2EHome, assert_one_line_error, e2e_home

#: Generous: only a stalled machine gets near it.
WAIT = 10.0

FOREIGN = b"FOREIGN-TOKEN-NOT-FROM-THE-DAEMON"


class FakeDaemon:
    """Listens on a real Unix socket at ``path``; ``behaviour`` handles each connection."""

    def __init__(self, path: Path, behaviour: Callable[[socket.socket], None]) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._behaviour = behaviour
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                self._behaviour(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(WAIT)


@pytest.fixture
def home() -> Iterator[E2EHome]:
    with e2e_home() as instance:
        yield instance


@pytest.fixture
def fakes() -> Iterator[Callable[[Path, Callable[[socket.socket], None]], FakeDaemon]]:
    """A factory of FakeDaemons, all closed afterwards."""
    started: list[FakeDaemon] = []

    def start(path: Path, behaviour: Callable[[socket.socket], None]) -> FakeDaemon:
        started.append(FakeDaemon(path, behaviour))
        return started[-1]

    yield start
    for fake in started:
        fake.close()


def plant_foreign_socket(home: E2EHome, fakes: Callable[..., FakeDaemon]) -> None:
    """A socket at <home>/evil.token.sock, outside the runtime dir: where '../evil' leads."""
    (home.home / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
    fakes(home.home / "evil.token.sock", lambda conn: conn.sendall(FOREIGN + b"\n"))


class TestProfileNameIsNotAPath:
    """A name no profile can have is refused (65) everywhere, never followed as a path."""

    @given(st.text(alphabet="ab.-_/ (\u00e9Z9", max_size=70))
    def test_fast_rule_is_the_state_rule(self, name: str) -> None:
        """rundir's re-free check accepts exactly the names validate_profile_name accepts."""
        try:
            validate_profile_name(name)
            valid = True
        except ProfileError:
            valid = False
        assert is_profile_name(name) == valid

    @pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x.lock", "a" * 65])
    def test_token_socket_path_refuses_non_names(self, name: str) -> None:
        """The one place a token socket path is built refuses a name no profile can have."""
        with pytest.raises(ProfileError):
            token_socket_name(name)
        with pytest.raises(ProfileError):
            resolve_paths({"AAC_TOKEND_HOME": "/tmp/x"}).token_socket(name)

    def test_exec_refuses_a_path_as_profile(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon]
    ) -> None:
        """`exec -p ../evil` exits 65 and runs nothing with a planted socket's token."""
        plant_foreign_socket(home, fakes)
        result = home.cli("exec", "-p", "../evil", "--", "sh", "-c", 'echo "$AAC_ACCESS_TOKEN"')
        assert_one_line_error(result, 65)
        assert FOREIGN.decode() not in result.stdout

    def test_api_refuses_a_path_as_profile(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon]
    ) -> None:
        """`api --base-url URL -p ../evil` exits 65 before any token is read."""
        plant_foreign_socket(home, fakes)
        result = home.cli("api", "GET", "/x", "--base-url", "http://127.0.0.1:9", "-p", "../evil")
        assert_one_line_error(result, 65)

    def test_get_token_refuses_env_path(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """get_token() with AAC_TOKEND_PROFILE=../evil raises ProfileError naming the variable."""
        plant_foreign_socket(home, fakes)
        monkeypatch.setenv("AAC_TOKEND_HOME", str(home.home))
        monkeypatch.setenv("AAC_TOKEND_PROFILE", "../evil")
        with pytest.raises(ProfileError, match="AAC_TOKEND_PROFILE") as info:
            get_token()
        assert info.value.exit_code == 65

    def test_get_token_refuses_argument_path(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """get_token("../evil") raises ProfileError rather than read the planted socket."""
        plant_foreign_socket(home, fakes)
        monkeypatch.setenv("AAC_TOKEND_HOME", str(home.home))
        with pytest.raises(ProfileError):
            get_token("../evil")

    def test_token_env_path_is_named(self, home: E2EHome, fakes: Callable[..., FakeDaemon]) -> None:
        """`token` with AAC_TOKEND_PROFILE=../evil exits 65 naming the variable."""
        plant_foreign_socket(home, fakes)
        result = home.cli("token", env=dict(home.env, AAC_TOKEND_PROFILE="../evil"))
        assert "AAC_TOKEND_PROFILE" in assert_one_line_error(result, 65)

"""The per-profile token sockets, read by real clients over real Unix sockets."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aac_tokend.client import read_token
from aac_tokend.errors import AlreadyRunningError, ProfileError
from aac_tokend.serve.token_server import TokenServer

TOKEN = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl"
NOBODY = 65534
#: Generous: only a stalled machine gets near it.
WAIT = 10.0


class FakeSource:
    """A token source whose answers the test sets; counts calls, can be made to fail."""

    def __init__(self, tokens: dict[str, bytes | None] | None = None) -> None:
        self.tokens: dict[str, bytes | None] = dict(tokens or {})
        self.calls = 0
        self.fail = False

    def current_token(self, profile: str) -> bytes | None:
        self.calls += 1
        if self.fail:
            raise RuntimeError(f"store broken, token was {TOKEN.decode()}")
        return self.tokens.get(profile)


@pytest.fixture
def source() -> FakeSource:
    return FakeSource({"default": TOKEN})


@pytest.fixture
def server(sockdir: Path, source: FakeSource) -> Iterator[TokenServer]:
    """A running TokenServer serving "default" from ``source``."""
    srv = TokenServer(sockdir, source)
    srv.add_profile("default")
    srv.start()
    yield srv
    srv.stop()


def run(argv: list[str], data: bytes = b"") -> bytes:
    return subprocess.run(argv, input=data, capture_output=True, timeout=WAIT, check=True).stdout


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


class TestReading:
    def test_stdlib_nc_and_socat_read_the_same_token(self, server: TokenServer) -> None:
        """Python's stdlib client, `nc -U` and socat all read exactly `<token>\\n`."""
        path = str(server.socket_path("default"))
        assert read_token(path) == TOKEN.decode()
        assert run(["nc", "-U", path]) == TOKEN + b"\n"
        assert run(["socat", "-", f"UNIX-CONNECT:{path}"]) == TOKEN + b"\n"
        assert server.served == 3

    def test_no_token_closes_without_writing(self, server: TokenServer, source: FakeSource) -> None:
        """When the source has no valid token, readers get an empty answer, not a stale one."""
        source.tokens["default"] = None
        path = str(server.socket_path("default"))
        assert read_token(path) == ""
        assert run(["nc", "-U", path]) == b""
        assert server.empty == 2

    def test_source_is_asked_on_every_read(self, server: TokenServer, source: FakeSource) -> None:
        """Expiry is the source's call on each read: a token that lapses stops being served."""
        path = str(server.socket_path("default"))
        assert read_token(path) == TOKEN.decode()
        source.tokens["default"] = None  # expired between two reads
        assert read_token(path) == ""
        source.tokens["default"] = b"new.token.value"
        assert read_token(path) == "new.token.value"
        assert source.calls == 3

    def test_source_failure_reads_empty_and_serving_goes_on(
        self, server: TokenServer, source: FakeSource
    ) -> None:
        """An exception in the source gives an empty read, is counted, and kills nothing."""
        path = str(server.socket_path("default"))
        source.fail = True
        assert read_token(path) == ""
        assert server.errors == 1
        source.fail = False
        assert read_token(path) == TOKEN.decode()

    def test_each_profile_serves_its_own_token(self, sockdir: Path) -> None:
        """Two profiles on two sockets each get their own token."""
        srv = TokenServer(sockdir, FakeSource({"a": b"token-a", "b": b"token-b"}))
        srv.add_profile("a")
        srv.add_profile("b")
        srv.start()
        try:
            assert read_token(str(srv.socket_path("a"))) == "token-a"
            assert read_token(str(srv.socket_path("b"))) == "token-b"
        finally:
            srv.stop()

    def test_many_concurrent_readers_all_get_the_token(self, server: TokenServer) -> None:
        """16 threads reading at once all get the full token every time."""
        path = str(server.socket_path("default"))
        results: list[str] = []

        def reader() -> None:
            results.extend(read_token(path) for _ in range(50))

        threads = [threading.Thread(target=reader) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert results == [TOKEN.decode()] * 800


class GatedSource(FakeSource):
    """Answers only once the test opens the gate, so a reader's input is surely pending."""

    def __init__(self, tokens: dict[str, bytes | None]) -> None:
        super().__init__(tokens)
        self.gate = threading.Event()

    def current_token(self, profile: str) -> bytes | None:
        self.gate.wait(WAIT)
        return super().current_token(profile)


class TestReadersThatSend:
    """A reader that writes something first still gets the token, not a reset."""

    @pytest.mark.parametrize("sent", [b"\n", b"GET token\r\n", b"x" * 20_000])
    def test_input_pending_at_close_is_drained(self, sockdir: Path, sent: bytes) -> None:
        """Input the reader sent before the answer is read and dropped before the close."""
        source = GatedSource({"default": TOKEN})
        srv = TokenServer(sockdir, source)
        srv.add_profile("default")
        srv.start()
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(WAIT)
                sock.connect(str(srv.socket_path("default")))
                sock.sendall(sent)
                source.gate.set()
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            assert data == TOKEN + b"\n"
        finally:
            srv.stop()

    @pytest.mark.skipif(shutil.which("nc") is None, reason="needs nc (netcat-openbsd)")
    def test_echo_into_nc_reads_the_token(self, server: TokenServer) -> None:
        """`echo | nc -U sock` prints the token (nc sends the newline it read)."""
        path = str(server.socket_path("default"))
        for _ in range(20):
            assert run(["nc", "-U", path], b"\n") == TOKEN + b"\n"

    def test_flooding_reader_does_not_hold_up_others(self, sockdir: Path) -> None:
        """A reader sending far more than the drain bound is closed; the next is served."""
        source = GatedSource({"default": TOKEN})
        srv = TokenServer(sockdir, source)
        srv.add_profile("default")
        srv.start()
        path = str(srv.socket_path("default"))
        try:
            with socket.socket(socket.AF_UNIX) as flood:
                flood.connect(path)
                flood.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while True:
                        flood.send(b"x" * 65536)
                source.gate.set()
                assert read_token(path, timeout=WAIT) == TOKEN.decode()
        finally:
            srv.stop()


class TestFiles:
    def test_socket_is_0600_in_the_directory(self, server: TokenServer, sockdir: Path) -> None:
        """The token socket is named after the profile and has mode 0600."""
        path = server.socket_path("default")
        assert path == sockdir / "default.token.sock"
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600

    def test_a_second_server_does_not_steal_a_live_socket(
        self, server: TokenServer, sockdir: Path
    ) -> None:
        """Adding a profile whose socket a live server holds fails; the first keeps serving."""
        other = TokenServer(sockdir, FakeSource({"default": b"impostor"}))
        with pytest.raises(AlreadyRunningError):
            other.add_profile("default")
        other.stop()
        assert read_token(str(server.socket_path("default"))) == TOKEN.decode()

    def test_stale_socket_is_replaced(self, sockdir: Path, source: FakeSource) -> None:
        """A dead socket file from a crashed daemon is replaced on add."""
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(str(sockdir / "default.token.sock"))
        dead.close()
        srv = TokenServer(sockdir, source)
        srv.add_profile("default")
        srv.start()
        try:
            assert read_token(str(srv.socket_path("default"))) == TOKEN.decode()
        finally:
            srv.stop()

    def test_stop_unlinks_sockets_quickly(self, sockdir: Path, source: FakeSource) -> None:
        """stop() returns within a second and leaves no socket file behind."""
        srv = TokenServer(sockdir, source, ping=lambda: None, ping_interval=5.0)
        srv.add_profile("default")
        srv.start()
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 1.0
        assert list(sockdir.iterdir()) == []

    def test_stop_before_start_cleans_up(self, sockdir: Path, source: FakeSource) -> None:
        """A server stopped without ever starting still unlinks what it bound."""
        srv = TokenServer(sockdir, source)
        srv.add_profile("default")
        srv.stop()
        assert list(sockdir.iterdir()) == []

    def test_inherited_listener_is_served_but_not_unlinked(
        self, sockdir: Path, source: FakeSource
    ) -> None:
        """A socket passed in (socket activation) is served; its file belongs to the caller."""
        path = sockdir / "default.token.sock"
        given = socket.socket(socket.AF_UNIX)
        given.bind(str(path))
        given.listen()
        srv = TokenServer(sockdir, source)
        srv.add_profile("default", given)
        srv.start()
        try:
            assert read_token(str(path)) == TOKEN.decode()
        finally:
            srv.stop()
        assert path.exists()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid (setpriv)")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv from util-linux")
class TestPeerCredentials:
    def test_other_uid_reads_nothing_and_is_counted(
        self, server: TokenServer, sockdir: Path
    ) -> None:
        """A reader of another uid gets nothing even when file modes would let it in."""
        path = server.socket_path("default")
        sockdir.chmod(0o755)  # loosen the file system on purpose: only the uid check is left
        path.chmod(0o666)
        nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        assert run([*nobody, "nc", "-U", str(path)]) == b""
        assert server.refused == 1
        assert server.served == 0
        assert read_token(str(path)) == TOKEN.decode()

    def test_uid_allowed_is_configurable(self, sockdir: Path, source: FakeSource) -> None:
        """A server told to serve uid 65534 refuses its own uid."""
        srv = TokenServer(sockdir, source, uid=NOBODY)
        srv.add_profile("default")
        srv.start()
        try:
            assert read_token(str(srv.socket_path("default"))) == ""
            assert srv.refused == 1
        finally:
            srv.stop()


class TestProfiles:
    def test_add_and_remove_while_serving(self, server: TokenServer, source: FakeSource) -> None:
        """Profiles come and go while the loop runs; a removed one's socket is gone."""
        source.tokens["extra"] = b"extra-token"
        path = server.add_profile("extra")
        assert server.profiles() == ["default", "extra"]
        assert read_token(str(path)) == "extra-token"
        server.remove_profile("extra")
        assert not path.exists()
        with pytest.raises(FileNotFoundError):
            read_token(str(path))
        assert server.add_profile("extra") == path
        assert read_token(str(path)) == "extra-token"
        assert read_token(str(server.socket_path("default"))) == TOKEN.decode()

    def test_churn_under_load(self, server: TokenServer, source: FakeSource) -> None:
        """Adding and removing profiles while readers hammer another one loses no read."""
        path = str(server.socket_path("default"))
        stop = threading.Event()
        bad: list[str] = []

        def reader() -> None:
            while not stop.is_set():
                got = read_token(path)
                if got != TOKEN.decode():
                    bad.append(got)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            for i in range(50):
                source.tokens[f"p{i}"] = f"t{i}".encode()
                added = server.add_profile(f"p{i}")
                assert read_token(str(added)) == f"t{i}"
                server.remove_profile(f"p{i}")
        finally:
            stop.set()
            for thread in threads:
                thread.join(WAIT)
        assert bad == []

    def test_duplicate_profile_is_refused(self, server: TokenServer) -> None:
        """Adding a profile that is already served is a caller error, not a silent rebind."""
        with pytest.raises(ProfileError, match="default"):
            server.add_profile("default")

    def test_duplicate_inherited_listener_is_refused_without_unlinking(
        self, server: TokenServer
    ) -> None:
        """A second listener for a served profile is closed; the served socket file stays."""
        spare = socket.socket(socket.AF_UNIX)
        spare.bind("\0atk-spare-" + str(os.getpid()))  # abstract: no file to confuse things
        spare.listen()
        with pytest.raises(ProfileError):
            server.add_profile("default", spare)
        assert spare.fileno() == -1
        assert read_token(str(server.socket_path("default"))) == TOKEN.decode()

    def test_removing_an_unknown_profile_is_a_no_op(self, server: TokenServer) -> None:
        """remove_profile of a profile not served changes nothing."""
        server.remove_profile("nope")
        assert server.profiles() == ["default"]

    def test_a_thousand_profiles(self, sockdir: Path) -> None:
        """1,000 profiles get 1,000 sockets, each serving its own token."""
        names = [f"profile-{i:04d}" for i in range(1000)]
        source = FakeSource({name: name.encode() for name in names})
        srv = TokenServer(sockdir, source)
        for name in names[:500]:
            srv.add_profile(name)
        srv.start()
        try:
            for name in names[500:]:
                srv.add_profile(name)  # the other half while serving
            assert len(srv.profiles()) == 1000
            for name in names:
                assert read_token(str(srv.socket_path(name))) == name
        finally:
            srv.stop()
        assert list(sockdir.iterdir()) == []


class TestPing:
    """The serving thread's ping (the daemon's watchdog) runs on its own schedule."""

    def test_ping_is_called_from_the_serving_thread(
        self, sockdir: Path, source: FakeSource
    ) -> None:
        """ping runs repeatedly, on the serving thread, even with no traffic."""
        threads: list[str] = []
        srv = TokenServer(
            sockdir,
            source,
            ping=lambda: threads.append(threading.current_thread().name),
            ping_interval=0.05,
        )
        srv.add_profile("default")
        srv.start()
        try:
            assert wait_for(lambda: len(threads) >= 3)
        finally:
            srv.stop()
        assert set(threads) == {"token-server"}

    def test_ping_is_not_called_more_often_than_its_interval(
        self, sockdir: Path, source: FakeSource
    ) -> None:
        """Busy traffic does not make ping run more often than every ping_interval."""
        srv = TokenServer(sockdir, source, ping=lambda: None, ping_interval=0.2)
        srv.add_profile("default")
        srv.start()
        started = time.monotonic()
        try:
            for _ in range(300):
                read_token(str(srv.socket_path("default")))
        finally:
            elapsed = time.monotonic() - started
            srv.stop()
        assert srv.pings <= elapsed / 0.2 + 1

    def test_failing_ping_does_not_stop_serving(self, sockdir: Path, source: FakeSource) -> None:
        """An exception in ping is counted and the loop keeps serving."""

        def broken() -> None:
            raise OSError("watchdog socket gone")

        srv = TokenServer(sockdir, source, ping=broken, ping_interval=0.02)
        srv.add_profile("default")
        srv.start()
        try:
            assert wait_for(lambda: srv.errors >= 2)
            assert read_token(str(srv.socket_path("default"))) == TOKEN.decode()
        finally:
            srv.stop()

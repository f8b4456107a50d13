"""Unix-socket plumbing: private directories, safe binding, peer credentials."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from aac_tokend.errors import AlreadyRunningError, InputError
from aac_tokend.serve.unixsock import (
    UNIX_PATH_MAX,
    adopt_listener,
    bind_listener,
    check_path_length,
    ensure_private_dir,
    fast_acceptor,
    peer_uid,
)

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class TestPrivateDir:
    def test_creates_with_parents_and_mode_0700(self, sockdir: Path) -> None:
        """A missing directory is created, parents included, with mode 0700."""
        target = sockdir / "a" / "b" / "run"
        ensure_private_dir(target)
        assert target.is_dir()
        assert mode(target) == 0o700

    def test_existing_directory_is_tightened(self, sockdir: Path) -> None:
        """An existing directory of ours with a looser mode is tightened to 0700."""
        target = sockdir / "run"
        target.mkdir()
        target.chmod(0o755)
        ensure_private_dir(target)
        assert mode(target) == 0o700

    def test_mode_0700_even_under_a_restrictive_umask(self, sockdir: Path) -> None:
        """The new directory is 0700 whatever the umask, so we can always enter it."""
        old = os.umask(0o777)
        try:
            ensure_private_dir(sockdir / "run")
        finally:
            os.umask(old)
        assert mode(sockdir / "run") == 0o700

    def test_symlink_is_refused_and_not_followed(self, sockdir: Path) -> None:
        """A symlink in place of the directory is refused, and its target keeps its mode."""
        elsewhere = sockdir / "elsewhere"
        elsewhere.mkdir(mode=0o755)
        elsewhere.chmod(0o755)
        link = sockdir / "run"
        link.symlink_to(elsewhere)
        with pytest.raises(InputError, match="symlink"):
            ensure_private_dir(link)
        assert link.is_symlink()
        assert mode(elsewhere) == 0o755

    def test_regular_file_is_refused(self, sockdir: Path) -> None:
        """A regular file where the directory should be is refused and left alone."""
        target = sockdir / "run"
        target.write_text("keep")
        with pytest.raises(InputError, match="not a directory"):
            ensure_private_dir(target)
        assert target.read_text() == "keep"

    @pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown a directory to nobody")
    def test_directory_of_another_user_is_refused(self, sockdir: Path) -> None:
        """A directory owned by another uid is refused, and its mode is not touched."""
        target = sockdir / "run"
        target.mkdir()
        target.chmod(0o755)
        os.chown(target, NOBODY, NOBODY)
        with pytest.raises(InputError, match="owned by uid 65534"):
            ensure_private_dir(target)
        assert mode(target) == 0o755

    def test_error_message_is_one_line(self, sockdir: Path) -> None:
        """Errors are one line, naming the path."""
        (sockdir / "run").write_text("")
        with pytest.raises(InputError) as info:
            ensure_private_dir(sockdir / "run")
        assert "\n" not in str(info.value)
        assert str(sockdir / "run") in str(info.value)


class TestPathLength:
    def test_longest_usable_path_is_accepted(self) -> None:
        """A path of exactly UNIX_PATH_MAX - 1 bytes is accepted."""
        check_path_length(Path("/" + "x" * (UNIX_PATH_MAX - 2)))

    def test_longer_path_names_path_limit_and_remedy(self) -> None:
        """One byte more is refused with the path, the limit and AAC_TOKEND_HOME named."""
        path = Path("/" + "x" * (UNIX_PATH_MAX - 1))
        with pytest.raises(InputError) as info:
            check_path_length(path)
        message = str(info.value)
        assert str(path) in message
        assert str(UNIX_PATH_MAX - 1) in message
        assert "AAC_TOKEND_HOME" in message

    def test_bind_checks_the_length_first(self) -> None:
        """bind_listener refuses an over-long path before touching the file system."""
        with pytest.raises(InputError, match="AAC_TOKEND_HOME"):
            bind_listener(Path("/tmp/" + "y" * 200 + ".sock"))


class TestBindListener:
    def test_socket_is_0600_nonblocking_and_listening(self, sockdir: Path) -> None:
        """The socket file is 0600, the listener non-blocking, and a client can connect."""
        path = sockdir / "t.sock"
        listener = bind_listener(path)
        try:
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            assert mode(path) == 0o600
            assert listener.getblocking() is False
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
        finally:
            listener.close()

    def test_umask_is_restored(self, sockdir: Path) -> None:
        """The process umask is the same after binding as before."""
        old = os.umask(0o022)
        try:
            bind_listener(sockdir / "t.sock").close()
            assert os.umask(0o022) == 0o022
        finally:
            os.umask(old)

    @pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Umask in /proc")
    def test_umask_of_other_threads_never_changes(self, sockdir: Path) -> None:
        """Binding never swaps the process-wide umask, which other threads' files and
        directories (and a courier forked meanwhile) would be created with."""
        old = os.umask(0o077)
        seen: set[str] = set()
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("Umask:"):
                        seen.add(line.split()[1])

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            for i in range(300):
                bind_listener(sockdir / f"s{i}.sock").close()
        finally:
            done.set()
            watcher.join(10)
            os.umask(old)
        assert seen == {"0077"}
        assert all(mode(sockdir / f"s{i}.sock") == 0o600 for i in range(300))

    def test_stale_socket_is_replaced(self, sockdir: Path) -> None:
        """A socket file nobody listens on (a crashed daemon's) is unlinked and rebound."""
        path = sockdir / "t.sock"
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(str(path))
        dead.close()  # the file stays behind
        listener = bind_listener(path)
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
        finally:
            listener.close()

    def test_live_socket_is_not_stolen(self, sockdir: Path) -> None:
        """A socket someone listens on raises AlreadyRunningError and keeps working."""
        path = sockdir / "t.sock"
        owner = socket.socket(socket.AF_UNIX)
        owner.bind(str(path))
        owner.listen()
        try:
            with pytest.raises(AlreadyRunningError):
                bind_listener(path)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
                conn, _ = owner.accept()
                conn.close()
        finally:
            owner.close()

    def test_planted_symlink_is_refused_and_not_followed(self, sockdir: Path) -> None:
        """A symlink at the socket path is refused; neither it nor its target is touched."""
        target = sockdir / "precious"
        target.write_text("keep")
        link = sockdir / "t.sock"
        link.symlink_to(target)
        with pytest.raises(InputError, match="not a socket"):
            bind_listener(link)
        assert link.is_symlink()
        assert target.read_text() == "keep"

    def test_symlink_to_a_stale_socket_is_refused(self, sockdir: Path) -> None:
        """Even a symlink pointing at a dead socket is refused, not followed and unlinked."""
        real = sockdir / "real.sock"
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(str(real))
        dead.close()
        link = sockdir / "t.sock"
        link.symlink_to(real)
        with pytest.raises(InputError):
            bind_listener(link)
        assert link.is_symlink()
        assert real.exists()

    def test_regular_file_and_directory_are_refused(self, sockdir: Path) -> None:
        """A regular file or a directory at the path is refused and left in place."""
        (sockdir / "f.sock").write_text("data")
        (sockdir / "d.sock").mkdir()
        for name in ("f.sock", "d.sock"):
            with pytest.raises(InputError, match="not a socket"):
                bind_listener(sockdir / name)
        assert (sockdir / "f.sock").read_text() == "data"
        assert (sockdir / "d.sock").is_dir()


class TestPeerAndAccept:
    def test_peer_uid_is_ours_on_a_socketpair(self) -> None:
        """peer_uid reads the kernel's record of the peer: here, ourselves."""
        left, right = socket.socketpair()
        with left, right:
            assert peer_uid(left) == os.getuid()

    def test_fast_acceptor_returns_usable_sockets(self, sockdir: Path) -> None:
        """The fast acceptor yields a socket that can check credentials, send and close."""
        listener = bind_listener(sockdir / "t.sock")
        accept = fast_acceptor(listener)
        try:
            with pytest.raises(BlockingIOError):
                accept()
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(sockdir / "t.sock"))
                conn = accept()
                assert peer_uid(conn) == os.getuid()
                conn.sendall(b"hi\n")
                conn.close()
                assert client.recv(10) == b"hi\n"
        finally:
            listener.close()

    def test_adopt_listener_makes_it_nonblocking(self, sockdir: Path) -> None:
        """An inherited listener is switched to non-blocking and otherwise kept as is."""
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(sockdir / "t.sock"))
        sock.listen()
        with sock:
            assert adopt_listener(sock) is sock
            assert sock.getblocking() is False

    def test_adopt_listener_refuses_a_datagram_socket(self) -> None:
        """A socket of the wrong kind from a broken unit file is refused."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with sock, pytest.raises(InputError, match="not a Unix stream socket"):
            adopt_listener(sock)

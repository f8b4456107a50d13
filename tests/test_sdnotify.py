"""sd_notify over a real datagram socket standing in for systemd's $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from aac_tokend.service import sdnotify

_RECV_TIMEOUT = 10.0  # generous: a datagram to a local socket arrives at once


class Receiver:
    """A bound AF_UNIX SOCK_DGRAM socket, the way the service manager listens."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.settimeout(_RECV_TIMEOUT)
        self.sock.bind(address)

    def message(self) -> str:
        return self.sock.recv(4096).decode("utf-8")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A receiver at a path in a short temp dir, named by NOTIFY_SOCKET."""
    tmp = tempfile.mkdtemp(prefix="atk", dir="/tmp")
    path = os.path.join(tmp, "notify")
    rx = Receiver(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield rx
    rx.close()
    shutil.rmtree(tmp)


class TestWithoutServiceManager:
    def test_unset_socket_sends_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without NOTIFY_SOCKET every helper returns False and raises nothing."""
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        assert sdnotify.notify("READY=1") is False
        assert sdnotify.ready("up") is False
        assert sdnotify.describe("x") is False
        assert sdnotify.reloading() is False
        assert sdnotify.stopping() is False
        assert sdnotify.watchdog_ping() is False

    def test_empty_socket_sends_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An empty NOTIFY_SOCKET counts as unset."""
        monkeypatch.setenv("NOTIFY_SOCKET", "")
        assert sdnotify.notify("READY=1") is False

    def test_dead_socket_returns_false(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A NOTIFY_SOCKET nobody listens on makes notify return False, not raise."""
        tmp = tempfile.mkdtemp(prefix="atk", dir="/tmp")
        try:
            monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(tmp, "gone"))
            assert sdnotify.notify("READY=1") is False
        finally:
            shutil.rmtree(tmp)

    def test_unsupported_address_returns_false(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An address kind we do not speak (vsock, relative path) returns False."""
        for value in ("vsock:2:1234", "relative/path"):
            monkeypatch.setenv("NOTIFY_SOCKET", value)
            assert sdnotify.notify("READY=1") is False


class TestMessages:
    def test_ready_carries_status(self, receiver: Receiver) -> None:
        """ready() sends READY=1 with a STATUS line in one datagram."""
        assert sdnotify.ready("serving 2 profiles") is True
        assert receiver.message() == "READY=1\nSTATUS=serving 2 profiles"

    def test_description_is_one_line(self, receiver: Receiver) -> None:
        """A newline in a description cannot start a second assignment."""
        assert sdnotify.describe("line one\nREADY=1") is True
        assert receiver.message() == "STATUS=line one READY=1"

    def test_stopping_and_watchdog(self, receiver: Receiver) -> None:
        """stopping() and watchdog_ping() send their single assignments."""
        assert sdnotify.stopping() is True
        assert receiver.message() == "STOPPING=1"
        assert sdnotify.watchdog_ping() is True
        assert receiver.message() == "WATCHDOG=1"

    @pytest.mark.skipif(not hasattr(time, "CLOCK_MONOTONIC"), reason="no CLOCK_MONOTONIC")
    def test_reloading_carries_monotonic_time(self, receiver: Receiver) -> None:
        """reloading() sends RELOADING=1 with the CLOCK_MONOTONIC time in microseconds."""
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert sdnotify.reloading() is True
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = receiver.message().split("\n")
        assert lines[0] == "RELOADING=1"
        key, _, value = lines[1].partition("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(value) <= after

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux")
    def test_abstract_namespace(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An @name NOTIFY_SOCKET reaches a receiver bound in the abstract namespace."""
        name = f"atk-notify-{os.getpid()}-{time.monotonic_ns()}"
        rx = Receiver(b"\0" + name.encode())
        try:
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
            assert sdnotify.notify("READY=1") is True
            assert rx.message() == "READY=1"
        finally:
            rx.close()


class TestWatchdogInterval:
    def test_disabled_without_usec(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """No WATCHDOG_USEC means no watchdog."""
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        assert sdnotify.watchdog_interval() is None

    def test_half_of_the_timeout(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The ping interval is half of WatchdogSec, in seconds."""
        monkeypatch.setenv("WATCHDOG_USEC", "30000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        assert sdnotify.watchdog_interval() == 15.0
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert sdnotify.watchdog_interval() == 15.0

    def test_other_pid_is_not_ours(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A WATCHDOG_PID naming another process means the watchdog is not ours."""
        monkeypatch.setenv("WATCHDOG_USEC", "30000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
        assert sdnotify.watchdog_interval() is None

    def test_garbage_is_disabled(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A WATCHDOG_USEC that is not a positive integer disables the watchdog."""
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        for value in ("", "abc", "0", "-5"):
            monkeypatch.setenv("WATCHDOG_USEC", value)
            assert sdnotify.watchdog_interval() is None

"""Socket activation: LISTEN_FDS parsing, in real subprocesses that own fds 3 and up."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aac_tokend.errors import InputError
from aac_tokend.service import activation

_REPO = Path(__file__).resolve().parent.parent
_TIMEOUT = 30.0  # generous: a Python start plus one local connection


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (which owns its fds 3.. unlike pytest)."""
    full_env = {**os.environ, "PYTHONPATH": str(_REPO), **env}
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", code],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        check=False,
    )


# The child puts listeners (or a pipe) on fds 3 and 4 itself, then describes what
# listen_fds() made of them.
_CHILD = """
import fcntl, json, os, socket, sys
from aac_tokend.service import activation
from aac_tokend.errors import InputError
tmp = sys.argv[1] if len(sys.argv) > 1 else None
kind = os.environ["ATK_KIND"]
if kind == "pipe":
    r, w = os.pipe()
    os.dup2(r, 3)
    count = 1
else:
    reserved = [os.open(os.devnull, os.O_RDONLY) for _ in range(2)]  # keep 3 and 4 taken
    for fd, name in ((3, "a.sock"), (4, "b.sock")):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.path.join(os.environ["ATK_DIR"], name))
        s.listen(1)
        os.dup2(s.fileno(), fd)  # dup2 leaves the copy inheritable, as systemd passes it
        s.close()
    count = 2
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(count)
if "ATK_NAMES" in os.environ:
    os.environ["LISTEN_FDNAMES"] = os.environ["ATK_NAMES"]
try:
    found = activation.listen_fds()
except InputError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
print(json.dumps({
    "names": {k: [s.fileno() for s in v] for k, v in found.items()},
    "cloexec": [
        bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in range(3, 3 + count)
    ],
    "stream": [s.type == socket.SOCK_STREAM for v in found.values() for s in v],
    "env": [os.environ.get(n) for n in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")],
}))
"""


@pytest.fixture
def short_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="atk", dir="/tmp")
    yield path
    shutil.rmtree(path)


class TestNotActivated:
    def test_no_variables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without LISTEN_* variables there are no sockets."""
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            monkeypatch.delenv(name, raising=False)
        assert activation.listen_fds() == {}

    def test_other_pid_is_ignored_and_unset(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Variables meant for another process yield nothing and are removed."""
        monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
        monkeypatch.setenv("LISTEN_FDS", "1")
        monkeypatch.setenv("LISTEN_FDNAMES", "control")
        assert activation.listen_fds() == {}
        assert "LISTEN_PID" not in os.environ
        assert "LISTEN_FDS" not in os.environ
        assert "LISTEN_FDNAMES" not in os.environ

    def test_unset_env_false_keeps_variables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With unset_env=False the variables stay for the caller to pass on."""
        monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
        monkeypatch.setenv("LISTEN_FDS", "1")
        activation.listen_fds(unset_env=False)
        assert os.environ["LISTEN_FDS"] == "1"

    def test_garbled_count_is_an_input_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A LISTEN_FDS that is not a count raises InputError before any fd is touched."""
        for value in ("two", "-1"):
            monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
            monkeypatch.setenv("LISTEN_FDS", value)
            with pytest.raises(InputError, match="LISTEN_FDS"):
                activation.listen_fds()


class TestInheritedDescriptors:
    def test_named_sockets_with_cloexec(self, short_dir: str) -> None:
        """fds 3 and 4 come back as sockets under their names (missing: unknown), close-on-exec."""
        done = _python(_CHILD, ATK_KIND="unix", ATK_DIR=short_dir, ATK_NAMES="control")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["names"] == {"control": [3], "unknown": [4]}
        assert report["cloexec"] == [True, True]
        assert report["stream"] == [True, True]
        assert report["env"] == [None, None, None]

    def test_same_name_groups(self, short_dir: str) -> None:
        """Two descriptors with one name are listed together, in fd order."""
        done = _python(_CHILD, ATK_KIND="unix", ATK_DIR=short_dir, ATK_NAMES="x.token:x.token")
        assert json.loads(done.stdout)["names"] == {"x.token": [3, 4]}

    def test_no_names_are_unknown(self, short_dir: str) -> None:
        """Without LISTEN_FDNAMES every descriptor is named unknown."""
        done = _python(_CHILD, ATK_KIND="unix", ATK_DIR=short_dir)
        assert json.loads(done.stdout)["names"] == {"unknown": [3, 4]}

    def test_non_socket_is_an_input_error(self) -> None:
        """A passed fd that is not a socket raises a one-line InputError naming it."""
        done = _python(_CHILD, ATK_KIND="pipe", ATK_NAMES="control")
        error = json.loads(done.stdout)["error"]
        assert "fd 3 (control)" in error
        assert "\n" not in error


_SERVE_ONE = """
import sys
from aac_tokend.service import activation
found = activation.listen_fds()
[listener] = found["control"]
conn, _ = listener.accept()
conn.sendall(b"served by " + ",".join(sorted(found)).encode())
conn.close()
"""


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian: apt-get install systemd)",
)
class TestUnderSystemdSocketActivate:
    def test_serves_on_the_passed_socket(self, short_dir: str) -> None:
        """A child started by systemd-socket-activate answers on the socket it was passed."""
        path = os.path.join(short_dir, "control.sock")
        env = {**os.environ, "PYTHONPATH": str(_REPO)}
        proc = subprocess.Popen(
            [
                "systemd-socket-activate",
                "-l",
                path,
                "--fdname=control",
                sys.executable,
                "-c",
                _SERVE_ONE,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + _TIMEOUT
            while not os.path.exists(path):
                assert time.monotonic() < deadline, "systemd-socket-activate never listened"
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.05)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(_TIMEOUT)
                client.connect(path)
                answer = client.recv(100)
            assert answer == b"served by control"
            assert proc.wait(timeout=_TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

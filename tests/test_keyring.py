"""The state key in the OS keyring: a real Secret Service (gnome-keyring on a private D-Bus).

The Secret Service tests start their own session bus and ``gnome-keyring-daemon``, unlocked
with a password on stdin, with HOME and the XDG directories in a temporary directory; they
skip, saying why, where dbus-daemon, gnome-keyring or the keyring package are missing.
The move tests with failures injected use ``testing.MemorySecrets`` and run everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aac_tokend.errors import KeyringUnavailableError, StateCorruptError, StorageError
from aac_tokend.store.files import load_or_create_key
from aac_tokend.store.keystore import (
    KEY_FILE,
    KEYRING_POINTER,
    OsKeyring,
    SecretBackend,
    key_in_keyring,
    load_keyring_key,
    move_to_file,
    move_to_keyring,
)
from aac_tokend.testing import FailingFileLayer, MemorySecrets
from tests.helpers_e2e import (
    E2EHome,
    RecordingSandbox,
    api_accepts,
    assert_one_line_error,
    import_pair,
    wait_until,
)

#: gnome-keyring answers within a second here; ten is a machine under load, not a hang.
SERVICE_START_TIMEOUT = 15.0
BACKEND = "keyring.backends.SecretService.Keyring"
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@dataclass
class SecretService:
    """A running private session bus with an unlocked gnome-keyring on it."""

    env: dict[str, str]  # what a process needs to use it
    root: Path

    def backend(self) -> Any:
        """The keyring package's Secret Service backend (this process talks to our bus)."""
        from keyring.backends.SecretService import Keyring

        return Keyring()

    def lock(self) -> None:
        """Lock the default collection, as a screen lock or a timeout would."""
        import secretstorage

        conn = secretstorage.dbus_init()
        try:
            secretstorage.get_default_collection(conn).lock()
        finally:
            conn.close()


@pytest.fixture
def secret_service(monkeypatch: pytest.MonkeyPatch) -> Iterator[SecretService]:
    """A fresh unlocked Secret Service; stopped, and its files removed, after the test."""
    for tool in ("dbus-daemon", "gnome-keyring-daemon"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (.ci/sysdeps installs it on Debian-like systems)")
    pytest.importorskip("keyring", reason="the keyring extra: pip install 'aac-tokend[keyring]'")
    pytest.importorskip("secretstorage", reason="keyring's Secret Service backend needs it")
    root = Path(tempfile.mkdtemp(prefix="atk-ss", dir="/tmp"))
    (root / "run").mkdir(mode=0o700)
    env = {
        "HOME": str(root / "home"),
        "XDG_DATA_HOME": str(root / "home" / "share"),
        "XDG_CONFIG_HOME": str(root / "home" / "config"),
        "XDG_RUNTIME_DIR": str(root / "run"),
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # No <servicedir>: the bus must not start a second, locked gnome-keyring of its own
        # (D-Bus activation) when a client asks before ours has claimed the name.
        (root / "bus.conf").write_text(BUS_CONFIG.format(path=root / "run" / "bus"))
        bus = subprocess.Popen(
            ["dbus-daemon", f"--config-file={root / 'bus.conf'}", "--nofork", "--print-address=1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, **env},
        )  # fmt: skip
        procs.append(bus)
        assert bus.stdout is not None
        address = bus.stdout.readline().decode().strip()
        if not address:
            pytest.skip("dbus-daemon could not start a session bus here")
        env["DBUS_SESSION_BUS_ADDRESS"] = address
        env["PYTHON_KEYRING_BACKEND"] = BACKEND
        errors = (root / "keyring.err").open("wb")
        keyring_daemon = subprocess.Popen(
            ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors,
            env={**os.environ, **env},
        )  # fmt: skip
        procs.append(keyring_daemon)
        assert keyring_daemon.stdin is not None
        keyring_daemon.stdin.write(b"test-password")  # the login keyring's password
        keyring_daemon.stdin.close()
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        service = SecretService(env, root)
        probe = OsKeyring(service.backend(), timeout=5.0)
        deadline = time.monotonic() + SERVICE_START_TIMEOUT
        while True:
            try:
                probe.set("probe", "ok")
                if probe.get("probe") == "ok":
                    probe.delete("probe")
                    break
            except KeyringUnavailableError as exc:
                if keyring_daemon.poll() is not None or time.monotonic() > deadline:
                    errors.close()
                    said = (root / "keyring.err").read_text(errors="replace")[-300:]
                    pytest.skip(f"gnome-keyring does not run here: {exc}; it said {said!r}")
                time.sleep(0.1)
        yield service
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        with contextlib.suppress(NameError):
            errors.close()
        shutil.rmtree(root, ignore_errors=True)


# -- the backend contract ----------------------------------------------------------------


class SecretBackendContract:
    """What every SecretBackend does; subclasses supply the ``backend`` fixture."""

    @pytest.fixture
    def backend(self) -> SecretBackend:
        raise NotImplementedError

    def test_missing_is_none(self, backend: SecretBackend) -> None:
        """A name never set reads as None."""
        assert backend.get("/never/set") is None

    def test_set_then_get(self, backend: SecretBackend) -> None:
        """What was set is what is read back, per name."""
        backend.set("/a", "00" * 32)
        backend.set("/b", "ff" * 32)
        assert (backend.get("/a"), backend.get("/b")) == ("00" * 32, "ff" * 32)

    def test_set_replaces(self, backend: SecretBackend) -> None:
        """A second set under a name replaces the first."""
        backend.set("/a", "one")
        backend.set("/a", "two")
        assert backend.get("/a") == "two"

    def test_delete_and_delete_again(self, backend: SecretBackend) -> None:
        """Delete removes the entry; deleting what is gone is not an error."""
        backend.set("/a", "one")
        backend.delete("/a")
        backend.delete("/a")
        assert backend.get("/a") is None


class TestMemorySecretsContract(SecretBackendContract):
    """testing.MemorySecrets passes the backend contract."""

    @pytest.fixture
    def backend(self) -> SecretBackend:
        return MemorySecrets()


class TestSecretServiceContract(SecretBackendContract):
    """OsKeyring on a real Secret Service passes the backend contract."""

    @pytest.fixture
    def backend(self, secret_service: SecretService) -> SecretBackend:
        return OsKeyring(secret_service.backend())


# -- moves, with failures injected -------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "config"


class TestMoveRoundTrip:
    """move-to-keyring and move-to-file keep the very same key, and only one home for it."""

    def test_round_trip_keeps_the_key(self, config: Path) -> None:
        """File -> keyring -> file: the key is unchanged, the file and pointer swap places."""
        secrets = MemorySecrets()
        key = load_or_create_key(config)
        move_to_keyring(config, secrets)
        assert key_in_keyring(config) and not (config / KEY_FILE).exists()
        assert load_or_create_key(config, keyring=secrets) == key
        move_to_file(config, secrets)
        assert not (config / KEYRING_POINTER).exists() and secrets.values == {}
        assert (config / KEY_FILE).stat().st_mode & 0o777 == 0o600
        assert load_or_create_key(config) == key

    def test_moves_are_idempotent(self, config: Path) -> None:
        """Each move run twice says so the second time and changes nothing."""
        secrets = MemorySecrets()
        key = load_or_create_key(config)
        move_to_keyring(config, secrets)
        assert "already" in move_to_keyring(config, secrets)
        move_to_file(config, secrets)
        assert "already" in move_to_file(config, secrets)
        assert load_or_create_key(config) == key


#: Each way a move-to-keyring can stop half way: (what fails, how to make it fail).
TO_KEYRING_FAILURES: dict[str, Callable[[MemorySecrets], FailingFileLayer]] = {
    "keyring write": lambda s: (s.fail.add("set"), FailingFileLayer())[1],
    "keyring read-back": lambda s: (s.fail.add("get"), FailingFileLayer())[1],
    "pointer write": lambda s: FailingFileLayer(failures={"write": errno.ENOSPC}),
    "pointer rename": lambda s: FailingFileLayer(failures={"rename": errno.EIO}),
    "directory fsync": lambda s: FailingFileLayer(failures={"fsync_dir": errno.EIO}),
}
TO_FILE_FAILURES: dict[str, Callable[[MemorySecrets], FailingFileLayer]] = {
    "keyring read": lambda s: (s.fail.add("get"), FailingFileLayer())[1],
    "file write": lambda s: FailingFileLayer(failures={"write": errno.ENOSPC}),
    "file fsync": lambda s: FailingFileLayer(failures={"fsync": errno.EIO}),
    "directory fsync": lambda s: FailingFileLayer(failures={"fsync_dir": errno.EIO}),
}


def _usable_key(config: Path, secrets: MemorySecrets) -> bytes:
    secrets.fail.clear()
    return load_or_create_key(config, keyring=secrets)


class TestMoveStoppedHalfWay:
    """A move that fails at any step leaves a usable key (the same one), never none."""

    @pytest.mark.parametrize("failure", sorted(TO_KEYRING_FAILURES))
    def test_to_keyring(self, config: Path, failure: str) -> None:
        """move-to-keyring failing at this step raises, and the original key still loads."""
        secrets = MemorySecrets()
        key = load_or_create_key(config)
        fs = TO_KEYRING_FAILURES[failure](secrets)
        with contextlib.suppress(KeyringUnavailableError, StorageError):
            move_to_keyring(config, secrets, fs)
        assert _usable_key(config, secrets) == key
        assert not [p.name for p in config.iterdir() if p.name.endswith(".tmp")]
        move_to_keyring(config, secrets)  # and running it again completes it
        assert key_in_keyring(config) and _usable_key(config, secrets) == key

    @pytest.mark.parametrize("failure", sorted(TO_FILE_FAILURES))
    def test_to_file(self, config: Path, failure: str) -> None:
        """move-to-file failing at this step raises, and the key still loads from somewhere."""
        secrets = MemorySecrets()
        key = load_or_create_key(config)
        move_to_keyring(config, secrets)
        fs = TO_FILE_FAILURES[failure](secrets)
        with contextlib.suppress(KeyringUnavailableError, StorageError):
            move_to_file(config, secrets, fs)
        assert _usable_key(config, secrets) == key
        assert not [p.name for p in config.iterdir() if p.name.endswith(".tmp")]
        move_to_file(config, secrets)
        assert not key_in_keyring(config) and load_or_create_key(config) == key

    def test_keyring_delete_failing_keeps_the_file_key(self, config: Path) -> None:
        """move-to-file whose keyring delete fails still moves the key, and says a copy stays."""
        secrets = MemorySecrets()
        key = load_or_create_key(config)
        move_to_keyring(config, secrets)
        secrets.fail.add("delete")
        assert "stays" in move_to_file(config, secrets)
        assert load_or_create_key(config) == key


class TestNeverANewKey:
    """With the pointer in place, a keyring that cannot give the key never yields a new one."""

    def test_locked_keyring_is_a_one_line_error(self, config: Path) -> None:
        """A refusing keyring: KeyringUnavailableError naming the pointer; no state.key made."""
        secrets = MemorySecrets()
        load_or_create_key(config)
        move_to_keyring(config, secrets)
        secrets.fail.add("get")
        with pytest.raises(KeyringUnavailableError) as caught:
            load_or_create_key(config, keyring=secrets)
        message = str(caught.value)
        assert "\n" not in message and KEYRING_POINTER in message
        assert "no new key was created" in message
        assert not (config / KEY_FILE).exists()

    def test_missing_entry_is_corrupt_not_new(self, config: Path) -> None:
        """The pointer without a keyring entry: StateCorruptError, and no state.key made."""
        secrets = MemorySecrets()
        load_or_create_key(config)
        move_to_keyring(config, secrets)
        secrets.values.clear()
        with pytest.raises(StateCorruptError, match="no new key was created"):
            load_or_create_key(config, keyring=secrets)
        assert not (config / KEY_FILE).exists()

    def test_damaged_entry_is_corrupt(self, config: Path) -> None:
        """An entry that is not 32 bytes of hex is reported as damaged."""
        secrets = MemorySecrets()
        load_or_create_key(config)
        move_to_keyring(config, secrets)
        (name,) = secrets.values
        secrets.values[name] = "not hex"
        with pytest.raises(StateCorruptError, match="damaged"):
            load_keyring_key(config, secrets)


# -- real processes, real Secret Service ---------------------------------------------------


def _cli_env(home: E2EHome, service: SecretService | None) -> dict[str, str]:
    env = dict(home.env)
    if service is not None:
        env.update(service.env)
    return env


class TestDaemonWithKeyring:
    """A real daemon whose key is in a real Secret Service refreshes and serves."""

    def test_move_refresh_serve_move_back(
        self,
        home: E2EHome,
        sandboxes: Callable[..., RecordingSandbox],
        secret_service: SecretService,
    ) -> None:
        """key move-to-keyring; the daemon refreshes and serves; move-to-file keeps the state."""
        env = _cli_env(home, secret_service)
        sandbox = sandboxes(access_ttl=3)
        import_pair(home, sandbox)
        config = home.paths.config_dir
        key = (config / KEY_FILE).read_bytes()
        moved = home.cli("key", "move-to-keyring", env=env)
        assert moved.returncode == 0, str(moved)
        assert key_in_keyring(config)
        assert home.cli("key", "where", env=env).stdout.startswith("OS keyring")
        stored = OsKeyring(secret_service.backend()).get(str(config.absolute()))
        assert stored == key.hex()

        home.env.update(secret_service.env)  # the daemon started at login has the session bus
        daemon = home.daemon().start(profiles=["default"])
        wait_until(lambda: daemon.profile_status()["refresh_count"] >= 1, 30.0, "a refresh")
        assert api_accepts(sandbox, daemon.token())
        assert daemon.stop() == 0
        assert not (config / KEY_FILE).exists(), "the daemon wrote a key file"

        back = home.cli("key", "move-to-file", env=env)
        assert back.returncode == 0, str(back)
        assert (config / KEY_FILE).read_bytes() == key
        assert OsKeyring(secret_service.backend()).get(str(config.absolute())) is None
        status = home.cli("status", "--json", env=env)
        row = json.loads(status.stdout)["profiles"][0]
        assert row["refresh_count"] >= 1 and row["state"] == "ok", row

    def test_locked_keyring_stops_the_daemon_with_one_line(
        self,
        home: E2EHome,
        sandboxes: Callable[..., RecordingSandbox],
        secret_service: SecretService,
    ) -> None:
        """Locked at start: the daemon exits 75 with one line saying unlock; no new key."""
        env = _cli_env(home, secret_service)
        import_pair(home, sandboxes())
        assert home.cli("key", "move-to-keyring", env=env).returncode == 0
        secret_service.lock()
        result = home.cli("run", env=env, timeout=60.0)
        line = assert_one_line_error(result, 75)
        assert "OS keyring" in line and "unlock" in line and "no new key" in line, line
        assert not (home.paths.config_dir / KEY_FILE).exists()


class TestNoKeyringAtAll:
    """Without any keyring service, the pointer makes the daemon stop, not start afresh."""

    def test_no_session_bus(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """No D-Bus: `run` exits 75 with one line, and state.key is not recreated."""
        pytest.importorskip(
            "keyring", reason="the keyring extra: pip install 'aac-tokend[keyring]'"
        )
        import_pair(home, sandboxes())
        config = home.paths.config_dir
        # The state as move-to-keyring leaves it, with a keyring that is no longer there.
        (config / KEY_FILE).unlink()
        (config / KEYRING_POINTER).write_text("in the keyring\n")
        env = dict(home.env, PYTHON_KEYRING_BACKEND=BACKEND)
        env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={home.root}/no-bus"
        result = home.cli("run", env=env, timeout=60.0)
        line = assert_one_line_error(result, 75)
        assert "OS keyring" in line and "no new key" in line, line
        assert not (config / KEY_FILE).exists()

    def test_status_without_the_key_still_answers_scripts(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """No daemon, key out of reach: --check 69 with a check line, --json prints JSON."""
        pytest.importorskip(
            "keyring", reason="the keyring extra: pip install 'aac-tokend[keyring]'"
        )
        import_pair(home, sandboxes())
        config = home.paths.config_dir
        (config / KEY_FILE).unlink()
        (config / KEYRING_POINTER).write_text("in the keyring\n")
        env = dict(home.env, PYTHON_KEYRING_BACKEND=BACKEND)
        env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={home.root}/no-bus"
        check = home.cli("status", "--check", env=env, timeout=60.0)
        assert check.returncode == 69, str(check)
        (line,) = check.stderr_lines()
        assert line.startswith("aac-tokend: check: ") and "unlock" in line, line
        shown = home.cli("status", "--json", env=env, timeout=60.0)
        answer = json.loads(shown.stdout)
        assert answer["daemon_running"] is False and answer["profiles"] == []
        assert "OS keyring" in answer["error"] and shown.returncode == 75, str(shown)
        assert not (config / KEY_FILE).exists()

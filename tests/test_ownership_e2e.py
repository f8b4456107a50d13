"""A chain has one owner, end to end: imports through the daemon and offline, and `remove`.

Real processes against the in-process sandbox, whose request log shows every refresh
token presented: a refused import must leave it without a reuse.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable

from aac_tokend.store.files import hold_lock
from aac_tokend.store.owner import DEAD_HOLDER_GRACE_SECONDS
from tests.helpers_e2e import (
    CliResult,
    Daemon,
    E2EHome,
    RecordingSandbox,
    assert_one_line_error,
    import_pair,
    wait_until,
)
from tests.test_daemon_e2e import assert_chain_unbroken, quiet_control


def import_again(
    home: E2EHome, sandbox: RecordingSandbox, pair: dict[str, object], profile: str
) -> CliResult:
    """``aac-tokend import`` of ``pair`` into ``profile``, as import_pair but not asserting."""
    return home.cli(
        "import", "--profile", profile, "--token-endpoint", sandbox.token_endpoint,
        "--base-url", sandbox.api_url, input=json.dumps(pair),
    )  # fmt: skip


def current_pair(sandbox: RecordingSandbox) -> dict[str, object]:
    """The pair the sandbox minted last (what the daemon holds after its last refresh)."""
    access, refresh = sandbox.issued[-2:]
    return {"access_token": access, "refresh_token": refresh, "expires_in": 3600}


def spend_one(home: E2EHome, sandbox: RecordingSandbox) -> tuple[Daemon, dict[str, object]]:
    """Import a pair into 'work', start the daemon, refresh once: the pair is now spent."""
    original = import_pair(home, sandbox, profile="work")
    daemon = home.daemon().start(profiles=["work"])
    assert home.cli("refresh", "-p", "work").returncode == 0
    assert sandbox.outcomes() == ["rotated"]
    return daemon, original


class TestThroughTheDaemon:
    """While the daemon runs, imports of a held or spent pair are refused and change nothing."""

    def test_pair_held_by_another_profile(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Importing work's current pair into 'home' exits 65 naming 'work'; work goes on."""
        sandbox = sandboxes()
        daemon, _ = spend_one(home, sandbox)
        held = current_pair(sandbox)
        line = assert_one_line_error(import_again(home, sandbox, held, "home"), 65)
        assert "profile 'work' already holds" in line and str(held["refresh_token"]) not in line
        assert daemon.status()["profiles"][0]["profile"] == "work"
        assert len(daemon.status()["profiles"]) == 1 and not home.state_file("home").exists()
        assert home.cli("refresh", "-p", "work").returncode == 0
        assert_chain_unbroken(sandbox)

    def test_spent_pair(self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]) -> None:
        """The rotated-away pair is refused as spent for its own and any other profile."""
        sandbox = sandboxes()
        daemon, original = spend_one(home, sandbox)
        served = daemon.token("work")
        before = home.state_file("work").read_bytes()
        for profile in ("work", "home"):
            line = assert_one_line_error(import_again(home, sandbox, original, profile), 65)
            assert "spent" in line, line
        assert home.state_file("work").read_bytes() == before
        assert daemon.token("work") == served
        assert home.cli("refresh", "-p", "work").returncode == 0
        assert_chain_unbroken(sandbox)  # the spent token never reached the server again

    def test_current_pair_is_a_no_op(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Re-importing the current pair says nothing changed: no write, no request."""
        sandbox = sandboxes()
        daemon, _ = spend_one(home, sandbox)
        before = home.state_file("work").read_bytes()
        result = import_again(home, sandbox, current_pair(sandbox), "work")
        assert result.returncode == 0, str(result)
        assert "nothing changed" in result.stdout
        assert home.state_file("work").read_bytes() == before
        assert daemon.profile_status("work")["refresh_count"] == 1
        assert sandbox.outcomes() == ["rotated"]


class TestOffline:
    """Without a daemon, `import` checks every stored profile the same way."""

    def test_held_spent_and_current(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Offline: held and spent pairs exit 65 untouched; the current pair is a no-op."""
        sandbox = sandboxes()
        _, original = spend_one(home, sandbox)
        assert home.cli("stop").returncode == 0
        held, before = current_pair(sandbox), home.state_file("work").read_bytes()
        line = assert_one_line_error(import_again(home, sandbox, held, "home"), 65)
        assert "profile 'work' already holds" in line
        for profile in ("work", "home"):
            assert "spent" in assert_one_line_error(
                import_again(home, sandbox, original, profile), 65
            )
        again = import_again(home, sandbox, held, "work")
        assert again.returncode == 0 and "nothing changed" in again.stdout, str(again)
        assert home.state_file("work").read_bytes() == before
        assert not home.state_file("home").exists()
        daemon = home.daemon().start(profiles=["work"])
        assert home.cli("refresh", "-p", "work").returncode == 0, daemon.output()
        assert_chain_unbroken(sandbox)

    def test_a_fresh_pair_replaces_and_keeps_the_history(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """A new pair imported over a used profile works; the old pair stays refused."""
        sandbox = sandboxes()
        _, original = spend_one(home, sandbox)
        assert home.cli("stop").returncode == 0
        import_pair(home, sandbox, profile="work")  # a new family
        assert "spent" in assert_one_line_error(import_again(home, sandbox, original, "work"), 65)

    def test_an_unreadable_state_file_refuses_imports(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Offline, a state file that cannot be read stops every import: exit 65, one line."""
        sandbox = sandboxes()
        # A store with its key (a key is never made beside state files it could not read).
        assert import_again(home, sandbox, sandbox.generate(), "other").returncode == 0
        spoiled = home.state_file("lost")
        spoiled.write_bytes(b"AATK\x01" + os.urandom(80))
        pair = sandbox.generate()
        line = assert_one_line_error(import_again(home, sandbox, pair, "work"), 65)
        assert str(spoiled) in line and "cannot be read" in line
        assert not home.state_file("work").exists()
        spoiled.unlink()
        assert import_again(home, sandbox, pair, "work").returncode == 0


def on_a_terminal(home: E2EHome, *args: str, answer: str) -> tuple[int, str]:
    """Run ``aac-tokend ARGS`` on a real pseudo-terminal, answer its prompt; (status, output)."""
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        home.command(*args), stdin=follower, stdout=follower, stderr=follower,
        env=home.env, cwd=home.root, start_new_session=True,
    )  # fmt: skip
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 30

    def read_some() -> bytes:
        try:
            return os.read(leader, 4096) if select.select([leader], [], [], 0.2)[0] else b""
        except OSError:  # EIO: the terminal's last writer is gone
            return b""

    try:
        while b"[y/N]" not in seen and proc.poll() is None and time.monotonic() < deadline:
            seen += read_some()
        if proc.poll() is None:
            os.write(leader, answer.encode() + b"\n")
        status = proc.wait(30)
        while chunk := read_some():
            seen += chunk
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, seen.decode(errors="replace")


class TestRemove:
    """`remove` asks before deleting a chain, and offline waits for the profile lock."""

    def test_a_terminal_is_asked(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """On a terminal, 'n' keeps the profile (exit 1) and 'y' removes it."""
        import_pair(home, sandboxes(), profile="work")
        status, output = on_a_terminal(home, "remove", "work", answer="n")
        assert "Remove profile 'work'?" in output and status == 1, output
        assert home.state_file("work").exists()
        status, output = on_a_terminal(home, "remove", "work", answer="y")
        assert status == 0 and "removed profile work" in output, output
        assert not home.state_file("work").exists()

    def test_no_terminal_needs_yes(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Without a terminal and without --yes, remove refuses in one line and keeps it."""
        import_pair(home, sandboxes(), profile="work")
        line = assert_one_line_error(home.cli("remove", "work"), 65)
        assert "--yes" in line and home.state_file("work").exists()
        daemon = home.daemon().start(profiles=["work"])
        assert_one_line_error(home.cli("remove", "work"), 65)
        assert daemon.token("work"), "a refused remove must not stop the serving"
        assert home.cli("remove", "--yes", "work").returncode == 0
        assert not home.state_file("work").exists()

    def test_offline_remove_waits_for_a_killed_daemons_courier(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """A courier outliving its daemon finishes first; the removed profile stays removed."""
        sandbox = sandboxes()
        import_pair(home, sandbox, profile="work")
        daemon = home.daemon().start(profiles=["work"])
        sandbox.set_answer_delay(5.0)  # the courier is still out when remove starts
        asker = threading.Thread(
            target=quiet_control, args=(daemon, "refresh"), kwargs={"profile": "work"}
        )
        asker.start()
        wait_until(lambda: len(sandbox.log()) == 1, 20, "the refresh request")
        daemon.kill()
        asker.join(20)
        started = time.monotonic()
        removed = home.cli("remove", "--yes", "work")
        assert removed.returncode == 0, str(removed)
        assert "waiting for a refresh of work" in removed.stderr
        assert time.monotonic() - started > 1.0, "remove did not wait for the courier"
        with hold_lock(home.paths.state_dir / "work.lock", 20):
            pass  # the courier has let go: whatever it was going to write is written
        assert not home.state_file("work").exists()
        assert home.cli("profiles").stdout == ""
        assert sandbox.outcomes() == ["rotated"]

    def test_a_daemon_started_during_an_offline_remove_waits(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """`run` during an offline remove that waits for a courier waits too, never exit 3."""
        sandbox = sandboxes()
        import_pair(home, sandbox, profile="work")
        import_pair(home, sandbox, profile="home")
        first = home.daemon().start(profiles=["work"])
        first.kill()  # the lock file still names this daemon, now dead
        courier = home.paths.state_dir / "work.lock"
        with hold_lock(courier, 5):  # a courier of the killed daemon, still out
            remover = subprocess.Popen(
                home.command("remove", "--yes", "work"), env=home.env, cwd=home.root,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            assert remover.stderr is not None
            assert "waiting for a refresh of work" in remover.stderr.readline()
            second = home.daemon().start(wait=False)
            time.sleep(DEAD_HOLDER_GRACE_SECONDS + 1.5)  # past the old exit 3
            assert second.alive, second.output()
        assert remover.wait(30) == 0
        second.wait_ready(profiles=["home"])
        assert not home.state_file("work").exists()
        assert home.cli("profiles").stdout == "home\n"

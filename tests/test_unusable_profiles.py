"""One bad profile never stops the daemon (issue 11, item 5), with the real daemon process.

A state file that cannot be named as a profile, decrypted or read sits beside a good one:
the daemon serves the good one, lists the others in ``status`` with what to do, and brings a
fixed one in without a restart. Names that would collide with the daemon's own files, and
profiles whose token socket could not be bound, are refused at import, before any write.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest

from aac_tokend.core.importer import build_state, parse_import_text
from aac_tokend.core.report import REPORT_FIELDS
from aac_tokend.store.files import FileStore, load_or_create_key
from tests.helpers_e2e import (
    E2EHome,
    RecordingSandbox,
    assert_one_line_error,
    import_pair,
    wait_until,
)

#: The daemon retries unusable files on its tick (every 2 s); allow a loaded machine's delay.
RETRY_TIMEOUT = 20.0


def _rows(home: E2EHome, daemon: Any) -> dict[str, dict[str, Any]]:
    return {row["profile"]: row for row in daemon.status()["profiles"]}


class TestBadStateFiles:
    """Misnamed, truncated, unreadable files and directories beside a good profile."""

    def test_daemon_serves_the_good_and_reports_the_bad(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """It starts, serves ``good``, lists each bad file with advice, and adopts fixes."""
        sandbox = sandboxes(access_ttl=600)
        import_pair(home, sandbox, profile="good")
        import_pair(home, sandbox, profile="trunc")
        import_pair(home, sandbox, profile="locked")
        state_dir = home.paths.state_dir
        trunc = state_dir / "trunc.state"
        whole = trunc.read_bytes()
        trunc.write_bytes(whole[:20])  # a sync tool's half-copied file
        shutil.copy(state_dir / "good.state", state_dir / "good (conflicted copy).state")
        (state_dir / "adir.state").mkdir()
        os.mkfifo(state_dir / "fifo.state", 0o600)  # would block a plain open() for ever
        unreadable = os.geteuid() != 0  # root reads a file whatever its mode
        if unreadable:
            (state_dir / "locked.state").chmod(0)

        expected = {
            "trunc": "corrupt",
            "good (conflicted copy)": "misnamed",
            "adir": "unreadable",
            "fifo": "unreadable",
        }
        if unreadable:
            expected["locked"] = "unreadable"
        offline = home.cli("status", "--json")  # no daemon: the same words, and no hang
        assert offline.returncode == 0, offline
        offline_rows = {r["profile"]: r["state"] for r in json.loads(offline.stdout)["profiles"]}
        assert {name: offline_rows[name] for name in expected} == expected

        daemon = home.daemon().start(profiles=["good"])
        rows = _rows(home, daemon)
        assert rows["good"]["state"] == "ok"
        for name, state in expected.items():
            assert rows[name]["state"] == state, rows[name]
            alert = rows[name]["alert"]
            assert "\n" not in alert and any(
                advice in alert for advice in ("move", "rename", "import", "fix")
            ), alert
        assert set(expected) | {"good", "locked"} == set(rows)
        for name in expected:  # every field a script reads, though the file is unusable
            assert set(rows[name]) == set(REPORT_FIELDS) and rows[name]["token_valid"] is False
        listed = json.loads(home.cli("profiles", "--json").stdout)["profiles"]
        assert sorted(set(expected) | {"good", "locked"}) == listed  # as offline lists them
        answer = daemon.control("token", profile="trunc")
        assert answer["ok"] is False and answer["code"] == "corrupt_state"
        text = home.cli("status")
        assert text.returncode == 0 and "fifo: unreadable" in text.stdout, text

        # Fixed while the daemon runs: restored, renamed, removed. No restart.
        trunc.write_bytes(whole)
        os.rename(state_dir / "good (conflicted copy).state", state_dir / "copy.state")
        (state_dir / "adir.state").rmdir()
        if unreadable:
            (state_dir / "locked.state").chmod(0o600)
        wait_until(lambda: daemon.token("trunc"), RETRY_TIMEOUT, "the restored profile's token")

        def followed() -> dict[str, dict[str, Any]] | None:
            now = _rows(home, daemon)
            return now if "adir" not in now and "copy" in now else None

        rows = wait_until(followed, RETRY_TIMEOUT, "status to follow the fixes")
        assert rows["trunc"]["state"] == "ok"
        assert "good (conflicted copy)" not in rows
        assert rows["copy"]["state"] == "corrupt"  # good's content: another profile's file
        if unreadable:
            assert rows["locked"]["state"] == "ok"
        assert daemon.token("good") and daemon.alive


class TestUnusableAlikeWithAndWithoutDaemon:
    """An unusable profile is answered the same way offline and through the daemon."""

    def test_remove_corrupt_profile_through_daemon(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """`remove --yes` deletes a corrupt profile's file with the daemon running, as offline."""
        sandbox = sandboxes(access_ttl=600)
        import_pair(home, sandbox, profile="good")
        import_pair(home, sandbox, profile="trunc")
        trunc = home.paths.state_dir / "trunc.state"
        trunc.write_bytes(trunc.read_bytes()[:20])
        daemon = home.daemon().start(profiles=["good"])
        assert _rows(home, daemon)["trunc"]["state"] == "corrupt"
        result = home.cli("remove", "--yes", "trunc")
        assert result.returncode == 0 and "removed profile trunc" in result.stdout, result
        assert not trunc.exists()
        assert set(_rows(home, daemon)) == {"good"} and daemon.token("good")

    def test_misnamed_token_same_offline_and_online(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """`token -p` of a misnamed file exits 69 with the same advice, daemon or not."""
        sandbox = sandboxes(access_ttl=600)
        import_pair(home, sandbox)
        state_dir = home.paths.state_dir
        shutil.copy(state_dir / "default.state", state_dir / "default (copy).state")
        offline = assert_one_line_error(home.cli("token", "-p", "default (copy)"), 69)
        daemon = home.daemon().start(profiles=["default"])
        online = assert_one_line_error(home.cli("token", "-p", "default (copy)"), 69)
        assert offline == online and "rename it to <profile>.state" in offline
        assert daemon.alive


class TestImportRefusals:
    """What would fail when served fails at import, before anything is saved."""

    @pytest.mark.parametrize("name", ["daemon", "Daemon"])
    def test_a_profile_named_daemon_is_an_ordinary_profile(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox], name: str
    ) -> None:
        """0.1.0 let ``Daemon`` be made on Linux: it imports, and removes, like any name."""
        sandbox = sandboxes()
        result = home.cli(
            "import", "--profile", name, "--token-endpoint", sandbox.token_endpoint,
            input=json.dumps(sandbox.generate()),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert (home.paths.state_dir / f"{name}.state").exists()
        assert home.cli("remove", "--yes", name).returncode == 0
        assert not (home.paths.state_dir / f"{name}.state").exists()

    def test_too_long_socket_path_is_refused_before_saving(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Offline and through the daemon: the token socket's length is checked first."""
        sandbox = sandboxes()
        # A home whose control socket fits but a 40-character profile's token socket does not.
        long_home = home.root / ("h" * (85 - len(str(home.root)) - 1))
        home.home = long_home
        home.env["AAC_TOKEND_HOME"] = str(long_home)
        assert len(str(home.paths.control_socket)) <= 107
        name = "p" * 40
        json_pair = json.dumps(sandbox.generate())
        args = ("import", "--profile", name, "--token-endpoint", sandbox.token_endpoint)
        line = assert_one_line_error(home.cli(*args, input=json_pair), 65)
        assert "shorter profile name" in line
        assert not (home.paths.state_dir / f"{name}.state").exists()
        daemon = home.daemon().start()
        request = parse_import_text(json_pair, profile=name)
        request = dataclasses.replace(request, token_endpoint=sandbox.token_endpoint)
        answer = daemon.control("import", **request.to_wire())
        assert answer["ok"] is False and "shorter profile name" in answer["message"]
        assert not (home.paths.state_dir / f"{name}.state").exists()

        # One that got in before this check (0.1.0) is served without a socket, not fatal.
        store = FileStore(home.paths.state_dir, load_or_create_key(home.paths.config_dir))
        store.save(build_state(request, time.time()))
        # Adopted first, then its socket tried (daemon._sync_sockets): wait for the verdict,
        # not only for the row (a status between the two shows the socket path, no alert).
        row = wait_until(
            lambda: next(
                (r for r in daemon.status()["profiles"] if r["profile"] == name and r["alert"]),
                None,
            ),
            RETRY_TIMEOUT,
            "the daemon to adopt the profile and report its socket",
        )
        assert row["token_socket"] is None and "no token socket" in row["alert"], row
        assert daemon.control("token", profile=name)["ok"] is True
        assert daemon.alive

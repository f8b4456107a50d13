"""Legacy API access tokens: served like any other, never refreshed, warned about, expired.

``import --legacy`` takes one static access token, with an expiry date (``--expires``), the
JWT's own ``exp``, or none at all. The engine scenarios run on fake time; the CLI ones run
the real daemon.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from aac_tokend.core.conditions import AlertEvent
from aac_tokend.core.importer import ImportRequest
from aac_tokend.core.tokens import parse_jwt
from aac_tokend.refresh.courier import CourierJob, CourierResult, InProcessRefresher, Refresher
from aac_tokend.sandbox.server import SandboxServer
from tests.scenario_support import (
    DAY,
    HOUR,
    World,
    cli,
    import_via_cli,
    running_daemon,
    short_dir,
    write_config,
)


@dataclass
class CountingRefresher:
    """Counts every refresh it is asked for, then carries it out with ``inner``."""

    inner: Refresher | None = None
    jobs: list[str] = field(default_factory=list)

    def refresh(self, job: CourierJob) -> CourierResult:
        self.jobs.append(job.profile)
        assert self.inner is not None
        return self.inner.refresh(job)


def opaque_token() -> str:
    """A legacy token as Designer Cloud issued them: not a JWT, no expiry inside."""
    return "dc-legacy-" + secrets.token_urlsafe(32)


@pytest.fixture
def legacy_world() -> Iterator[tuple[World, CountingRefresher]]:
    counting = CountingRefresher()
    world = World.build(refresher=counting)
    counting.inner = InProcessRefresher(world.store, clock=world.clock.now)
    yield world, counting
    world.close()


def import_legacy(world: World, token: str, expires_at: float | None, profile: str = "old") -> None:
    world.engine.import_profile(
        ImportRequest(
            profile=profile, access_token=token, legacy=True, legacy_expires_at=expires_at
        )
    )


class TestLegacyEngine:
    """On fake time: serving, warnings, expiry, re-import; the refresher is never called."""

    def test_served_until_its_expiry_with_warnings_and_never_refreshed(
        self, legacy_world: tuple[World, CountingRefresher]
    ) -> None:
        """10 days: served, warned at 7 d and 1 d (reminded daily), expired once, no refresh."""
        world, counting = legacy_world
        token = opaque_token()
        expires = world.clock.now() + 10 * DAY
        import_legacy(world, token, expires)
        row = world.status("old")
        assert row["kind"] == "legacy" and row["state"] == "ok" and row["token_valid"]
        assert row["next_refresh_at"] is None and row["refresh_expires_at"] is None
        assert row["token_endpoint"] is None and row["alert"] is None
        world.run(3 * DAY - HOUR, step=HOUR)
        assert world.recorder.events("old") == []
        world.run(HOUR, step=HOUR)
        assert world.recorder.events("old") == [AlertEvent.REFRESH_EXPIRES_SOON]
        assert "legacy access token expires in 7.0 days" in world.status("old")["alert"]
        world.run(7 * DAY - 2, step=HOUR)
        assert world.token("old") == token.encode()  # served to the last second (1 s margin)
        world.run(4, step=1)
        assert world.token("old") is None
        row = world.status("old")
        assert row["state"] == "expired" and not row["token_valid"]
        assert "legacy access token has expired" in row["alert"]
        assert "aac-tokend import --profile old" in row["alert"]
        world.run(DAY - HOUR, step=HOUR)
        events = world.recorder.events("old")
        assert events.count(AlertEvent.EXPIRED) == 1 and events[-1] is AlertEvent.EXPIRED
        assert set(events) == {AlertEvent.REFRESH_EXPIRES_SOON, AlertEvent.EXPIRED}
        soon = [m for _, e, m in world.recorder.sent if e is AlertEvent.REFRESH_EXPIRES_SOON]
        assert any("expires in 1.0 days" in m for m in soon)  # the one-day warning came
        world.engine.refresh("old")
        assert counting.jobs == [] and world.token_requests() == []

    def test_without_an_expiry_it_is_served_for_ever_in_silence(
        self, legacy_world: tuple[World, CountingRefresher]
    ) -> None:
        """No --expires and no JWT: served for 400 days, no alert, never refreshed."""
        world, counting = legacy_world
        token = opaque_token()
        import_legacy(world, token, None)
        world.run(400 * DAY, step=DAY)
        assert world.token("old") == token.encode()
        row = world.status("old")
        assert row["state"] == "ok" and row["access_expires_at"] is None and row["alert"] is None
        assert world.recorder.sent == [] and counting.jobs == []

    def test_a_jwt_without_expires_uses_its_own_exp(
        self, legacy_world: tuple[World, CountingRefresher]
    ) -> None:
        """A legacy JWT with no --expires lives until its ``exp``, then is not served."""
        world, _ = legacy_world
        jwt = str(world.sandbox.generate()["access_token"])
        import_legacy(world, jwt, None)
        exp = parse_jwt(jwt).exp
        assert world.status("old")["access_expires_at"] == _iso(exp)
        world.run(exp - world.clock.now() - 2, step=60)
        assert world.token("old") == jwt.encode()
        world.run(3, step=1)
        assert world.token("old") is None and world.status("old")["state"] == "expired"

    def test_importing_a_new_legacy_token_recovers(
        self, legacy_world: tuple[World, CountingRefresher]
    ) -> None:
        """An expired legacy token replaced by a new one: served again, recovered said once."""
        world, _ = legacy_world
        import_legacy(world, opaque_token(), world.clock.now() + HOUR)
        world.run(2 * HOUR, step=60)
        assert world.status("old")["state"] == "expired"
        fresh = opaque_token()
        import_legacy(world, fresh, world.clock.now() + 30 * DAY)
        assert world.token("old") == fresh.encode() and world.status("old")["state"] == "ok"
        events = world.recorder.events("old")
        assert events[-1] is AlertEvent.RECOVERED and events.count(AlertEvent.RECOVERED) == 1

    def test_a_legacy_profile_beside_an_oauth_one_is_left_alone(
        self, legacy_world: tuple[World, CountingRefresher]
    ) -> None:
        """Refresh schedules are per profile: only the OAuth chain reaches the refresher."""
        world, counting = legacy_world
        import_legacy(world, opaque_token(), None)
        world.import_pair("work")
        world.run(2 * HOUR, step=60)
        assert set(counting.jobs) == {"work"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- the command line and the real daemon ------------------------------------------------------


@pytest.fixture
def home() -> Iterator[Path]:
    path = short_dir()
    write_config(path, "notifications = false\n")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def status_row(home: Path, profile: str) -> dict[str, object]:
    answer = cli(home, "status", "--json")
    assert answer.returncode == 0, answer.stderr
    rows = json.loads(answer.stdout)["profiles"]
    return next(r for r in rows if r["profile"] == profile)


class TestLegacyCommandLine:
    """``aac-tokend import --legacy`` with and without a daemon, then ``token`` and ``status``."""

    def test_import_with_expires_then_the_daemon_serves_it(self, home: Path) -> None:
        """Imported offline with --expires: served on the socket; status says kind legacy."""
        token = opaque_token()
        done = cli(home, "import", "--legacy", "--expires", "2099-01-31", "-p", "old",
                   stdin=token + "\n")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert token not in done.stdout + done.stderr
        with running_daemon(home) as daemon:
            served = cli(home, "token", "-p", "old")
            assert served.returncode == 0 and served.stdout == token + "\n"
            row = status_row(home, "old")
            assert row["kind"] == "legacy" and row["state"] == "ok"
            assert row["access_expires_at"] == "2099-01-31T00:00:00Z"
            assert row["next_refresh_at"] is None
            text = cli(home, "status").stdout
            assert "old: ok (legacy)" in text
            refreshed = cli(home, "refresh", "-p", "old")
            assert refreshed.returncode == 0
            assert cli(home, "token", "-p", "old").stdout == token + "\n"
            assert token not in daemon.log_text()

    def test_import_without_expiry_through_the_running_daemon(self, home: Path) -> None:
        """With a daemon running, import --legacy takes effect at once; no expiry is shown."""
        token = opaque_token()
        with running_daemon(home):
            done = cli(home, "import", "--legacy", "-p", "old", stdin=token)
            assert done.returncode == 0 and "handed to the running daemon" in done.stdout
            assert cli(home, "token", "-p", "old").stdout == token + "\n"
            row = status_row(home, "old")
            assert row["kind"] == "legacy" and row["access_expires_at"] is None
            assert row["state"] == "ok" and row["alert"] is None

    def test_an_expired_legacy_token_is_refused_with_instructions(self, home: Path) -> None:
        """Past its --expires date: no token (exit 69) and a line saying what to do."""
        token = opaque_token()
        assert cli(home, "import", "--legacy", "--expires", "2001-01-01T00:00:00+00:00",
                   "-p", "old", stdin=token).returncode == 0  # fmt: skip
        with running_daemon(home):
            served = cli(home, "token", "-p", "old")
            assert served.returncode == 69 and served.stdout == ""
            assert "expired" in served.stderr and "aac-tokend import --profile old" in served.stderr
            assert status_row(home, "old")["state"] == "expired"

    def test_a_bad_expires_date_is_an_input_error(self, home: Path) -> None:
        """--expires that is not a date: exit 65, one line naming the option, nothing saved."""
        done = cli(home, "import", "--legacy", "--expires", "soon", "-p", "old",
                   stdin=opaque_token())  # fmt: skip
        assert done.returncode == 65
        assert done.stderr.count("\n") == 1 and "--expires" in done.stderr
        assert not (home / "state" / "old.state").exists()


class TestLegacyOverALiveChain:
    """A --legacy import never deletes a live chain's refresh token without --yes."""

    @staticmethod
    def import_chain(home: Path, sandbox: SandboxServer) -> None:
        done = import_via_cli(home, sandbox.generate(), "-p", "work",
                              "--token-endpoint", sandbox.token_endpoint)  # fmt: skip
        assert done.returncode == 0, done.stderr

    def test_refused_offline_and_the_chain_is_kept(self, home: Path) -> None:
        """Without a daemon or a terminal: exit 65, one line naming --yes, the chain stays."""
        with SandboxServer() as sandbox:
            self.import_chain(home, sandbox)
            done = cli(home, "import", "--legacy", "-p", "work", stdin=opaque_token())
            assert done.returncode == 65 and done.stderr.count("\n") == 1, done.stderr
            assert "live OAuth chain" in done.stderr and "--yes" in done.stderr
            assert status_row(home, "work")["kind"] == "oauth"

    def test_refused_by_the_daemon_and_replaced_with_yes(self, home: Path) -> None:
        """Through the daemon: refused (exit 65) without --yes; with --yes it is replaced."""
        with SandboxServer() as sandbox:
            self.import_chain(home, sandbox)
            with running_daemon(home):
                token = opaque_token()
                done = cli(home, "import", "--legacy", "-p", "work", stdin=token)
                assert done.returncode == 65 and "--yes" in done.stderr, done.stderr
                assert status_row(home, "work")["kind"] == "oauth"
                done = cli(home, "import", "--legacy", "--yes", "-p", "work", stdin=token)
                assert done.returncode == 0, done.stderr
                assert status_row(home, "work")["kind"] == "legacy"
                assert cli(home, "token", "-p", "work").stdout == token + "\n"


def test_the_counting_refresher_sees_oauth_refreshes(
    legacy_world: tuple[World, CountingRefresher],
) -> None:
    """The counting fake does record refreshes, so "never called" above means something."""
    world, counting = legacy_world
    world.import_pair("work")
    world.engine.refresh("work")
    assert counting.jobs == ["work"]

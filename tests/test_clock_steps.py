"""Wall-clock steps: never an expired token served, no refresh slept through, no refresh loop.

Issue 11, item 11. The fake clock's wall time steps (NTP, a person, a restored VM) while its
monotonic time advances normally; the sandbox, like a real server, keeps true time. Expiries
are wall time (``exp``), so serving stops by whichever clock says the token is over first,
and a healthy chain's refresh comes due by whichever says it is older.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aac_tokend.core.policy import SERVE_MARGIN_SECONDS
from aac_tokend.core.tokens import parse_jwt
from aac_tokend.testing import T0
from tests.scenario_support import HOUR, World, api_accepts

STEP = 1.0  # seconds between wake-ups: the tick's cadence, rounded down


@pytest.fixture
def world() -> Iterator[World]:
    world = World.build(access_ttl=HOUR, server_on_true_time=True)
    yield world
    world.close()


def served_is_alive(world: World) -> bool:
    """The served token (if any) outlives the read by both clocks; True if nothing is served."""
    token = world.token()
    if token is None:
        return True
    server_exp = parse_jwt(token.decode()).exp  # the server's own clock: true time
    state_exp = world.engine._profiles["work"].state.access_expires_at
    assert state_exp is not None
    true_ok = world.clock.true_now() + SERVE_MARGIN_SECONDS <= server_exp
    wall_ok = world.clock.now() + SERVE_MARGIN_SECONDS <= state_exp
    return true_ok and wall_ok


def refreshes(world: World) -> int:
    return sum(1 for e in world.token_requests() if e["outcome"] == "rotated")


class TestServingAcrossSteps:
    """The token server's source never hands out a token past its end by either clock."""

    def test_a_backward_step_does_not_stretch_a_token(self, world: World) -> None:
        """Wall clock back an hour, no refresh possible: serving ends at the true expiry."""
        world.import_pair()
        world.sandbox.stop()  # every refresh fails: only expiry ends serving
        world.run(20 * 60, step=10)
        world.clock.step(-HOUR)
        served_until = None
        for _ in range(int(HOUR / 10)):
            world.clock.advance(10)
            world.step()
            assert served_is_alive(world)
            if world.token() is not None:
                served_until = world.clock.true_now()
        assert world.token() is None  # wall says 10 min left; the token died 50 min ago
        assert world.status()["token_valid"] is False
        assert served_until is not None and served_until <= T0 + HOUR

    def test_a_forward_step_stops_serving_at_once(self, world: World) -> None:
        """Wall clock forward past the expiry: the token is not served, whatever it says."""
        world.import_pair()
        world.sandbox.stop()
        world.run(60)
        world.clock.step(2 * HOUR)
        assert world.token() is None

    def test_a_failed_refresh_does_not_win_back_the_stepped_time(self, world: World) -> None:
        """A state reinstalled after a failed attempt keeps the token's monotonic end."""
        world.import_pair()
        world.sandbox.stop()
        world.clock.step(-HOUR)
        world.run(HOUR - SERVE_MARGIN_SECONDS, step=5)  # failed attempts, each reinstalling it
        assert world.engine._profiles["work"].state.consecutive_failures > 3
        assert world.token() is None


class TestSchedulingAcrossSteps:
    """The refresh is neither slept through nor repeated in a loop when the wall clock steps."""

    def test_backward_step_refreshes_on_time(self, world: World) -> None:
        """Back an hour after 10 min: the refresh still lands before the true expiry; no gap."""
        world.import_pair()
        world.run(10 * 60, step=10)
        world.clock.step(-HOUR)
        for _ in range(int(HOUR / STEP)):
            world.clock.advance(STEP)
            world.step()
            assert world.token() is not None, "a gap: the refresh was slept through"
            assert served_is_alive(world)
        assert refreshes(world) >= 1
        assert api_accepts(world.sandbox, world.token() or b"")

    @pytest.mark.parametrize("step", [-HOUR, -10 * 24 * HOUR, 24 * HOUR, 30 * 60])
    def test_no_refresh_loop_after_a_step(self, world: World, step: float) -> None:
        """Three true hours after a step: about one refresh per 45 minutes, not one per tick."""
        world.import_pair()
        world.run(10 * 60, step=10)
        world.clock.step(step)
        world.run(3 * HOUR, step=STEP)
        # 3 h at ~75 % of a 1 h lifetime is 4; one more for a forward step's early refresh.
        assert 3 <= refreshes(world) <= 6
        assert world.token() is not None and served_is_alive(world)

    def test_forward_step_refreshes_within_seconds(self, world: World) -> None:
        """Forward a day: the token is dead by the wall clock, and a new one comes within 5 s."""
        world.import_pair()
        world.run(60)
        world.clock.step(24 * HOUR)
        assert world.token() is None
        took = world.run_until(lambda: world.token() is not None, limit=5.0, step=0.5)
        assert took is not None and took <= 5.0
        assert api_accepts(world.sandbox, world.token() or b"")


class TestBackoffAcrossSteps:
    """A failing chain keeps its retry cadence when the wall clock steps back."""

    def test_a_failing_chain_keeps_retrying_after_a_backward_step(self, world: World) -> None:
        """Endpoint down, clock back an hour: attempts go on every few minutes, not in an hour."""
        proxy = world.proxy()
        world.import_pair(token_endpoint=proxy.token_endpoint)
        proxy.down()
        world.run(50 * 60, step=2 * STEP)  # the refresh at ~45 min fails, then backs off
        before = world.engine._profiles["work"].state.consecutive_failures
        world.clock.step(-HOUR)
        world.run(15 * 60, step=2 * STEP)
        after = world.engine._profiles["work"].state.consecutive_failures
        assert after - before >= 3  # capped backoff: at least every 5 minutes

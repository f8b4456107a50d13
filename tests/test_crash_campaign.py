"""The crash campaign, short: 25 daemon SIGKILLs lose no chain; a courier's loss is named right.

``make crash`` runs the long version (300 daemon kills); this one runs inside ``make test``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from aac_tokend.sandbox.server import SandboxServer

from .crash_campaign import COURIER_ACCESS_TTL, Tally, judge, run_campaign
from .crash_rig import Chain, chains
from .crash_storage import FAULTS, run_faults


def _entry(seq: int, rt: str, outcome: str, new: str | None = None) -> dict[str, Any]:
    return {"seq": seq, "at": 0.0, "rt_hash": rt, "client_id": "c", "outcome": outcome,
            "new_rt_hash": new, "family": "f"}  # fmt: skip


class TestReferee:
    """The judge of the sandbox log fails a run when the rules are broken."""

    def test_clean_chain_passes(self) -> None:
        """Each token presented once, each the previous rotation's new one: no finding."""
        log = [_entry(1, "a", "rotated", "b"), _entry(2, "b", "rotated", "c")]
        (chain,) = chains(log, ["a"])
        assert judge(chain) == [] and not chain.lost and chain.current_rt_hash == "c"

    def test_gap_in_a_kept_chain_is_a_finding(self) -> None:
        """A rotation that does not present the newest token is reported."""
        chain = Chain("a", [_entry(1, "a", "rotated", "b"), _entry(2, "x", "rotated", "c")])
        assert judge(chain) == ["seq 2: rotated x, expected b"]

    def test_loss_revealed_by_the_retry_passes(self) -> None:
        """A lost answer retried with the same token ends the chain as expected."""
        log = [_entry(1, "a", "rotated", "b"), _entry(2, "a", "reuse_revoked")]
        (chain,) = chains(log, ["a"])
        assert chain.lost and judge(chain) == []

    def test_loss_by_an_old_token_is_a_finding(self) -> None:
        """A chain revoked by a token older than the last spent one is not a lost answer."""
        log = [
            _entry(1, "a", "rotated", "b"),
            _entry(2, "b", "rotated", "c"),
            _entry(3, "a", "reuse_revoked"),
        ]
        (chain,) = chains(log, ["a"])
        assert judge(chain) == ["seq 3: the chain ended reuse_revoked, not by a retry"]

    def test_a_finding_fails_the_campaign(self) -> None:
        """Any finding turns the verdict to FAIL (``make crash`` then exits 1)."""
        tally = Tally(problems=["a courier killed before the request lost the chain"])
        assert not tally.ok and tally.lines()[-1] == "FAIL (1 findings)"


class TestDiskFaults:
    """The disk-fault phase: a daemon that dies holding a pair the disk refused loses nothing."""

    def test_daemon_deaths_on_a_failing_disk_lose_no_chain(self) -> None:
        """Its pending copy is adopted; only a failing pending directory too loses the chain."""
        dying = tuple(f for f in FAULTS if f.daemon_dies)
        with SandboxServer(access_ttl=COURIER_ACCESS_TTL) as sandbox:
            results = run_faults(sandbox, dying)
        report = [(r.fault.name, r.lost, r.reason, r.problems) for r in results]
        assert [r.fault.name for r in results if r.lost] == [
            f.name for f in dying if f.pending_fails
        ], report
        assert all(not r.problems for r in results), report
        assert any(not f.pending_fails for f in dying), "no fault kills the daemon on a bad disk"


class TestShortCampaign:
    """The campaign itself, with 25 daemon kills and 4 courier kills."""

    @pytest.mark.slow
    def test_daemon_kills_lose_nothing(self) -> None:
        """0 chains lost to daemon kills; courier losses only inside the window, named right."""
        tally = run_campaign(kills=25, courier_kills=4, seed=int(time.time()), window_samples=10)
        report = "\n".join(tally.lines())
        assert tally.daemon_kills == 25, report
        assert sum(tally.daemon_losses.values()) == 0, report
        assert set(tally.courier_losses) <= {"after_lost_response"}, report
        assert tally.courier_kills_in_window >= 1, report  # the window was really reached
        assert tally.ok, report

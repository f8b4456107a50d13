"""The fleet campaign, short: one round of every fault in ``PLAN``, judged by the referee.

``make fleet-crash`` runs the long version (200 faults); this one runs inside ``make test``
once the daemon runs in fleet mode (``aac_tokend/fleet/runtime.py``, issue #13 part D).
"""

from __future__ import annotations

import importlib.util

import pytest

from .etcd_cluster import ETCD, SKIP_REASON
from .fleet_campaign import Tally, run_campaign
from .fleet_faults import PLAN, Fault, Step
from .fleet_referee import Finding, Verdict, Violation

FLEET_DAEMON = importlib.util.find_spec("aac_tokend.fleet.runtime") is not None


def verdict(*findings: Finding) -> Verdict:
    return Verdict(findings, 10, 5, 0, 100, 3)


class TestTally:
    def test_a_clean_verdict_passes(self) -> None:
        """No problem and a clean verdict: PASS, with each fault and step counted."""
        tally = Tally(seed=7, verdict=verdict())
        tally.applied[(Fault.CUT, Step.ANSWERED)] += 2
        tally.missed[(Fault.CUT, Step.ANSWERED)] += 1
        lines = tally.lines()
        assert tally.ok and lines[-1] == "PASS"
        assert "  cut owner from etcd between answer and outcome commit: 2 (1 missed the step)" in (
            lines
        )

    def test_a_referee_finding_fails_the_campaign(self) -> None:
        """One finding of the referee turns the verdict to FAIL (``make fleet-crash`` exits 1)."""
        tally = Tally(seed=7, verdict=verdict(Finding(Violation.SENT_TWICE, "alpha: r1")))
        assert not tally.ok and tally.lines()[-1] == "FAIL (1 findings)"
        assert "FINDING: a refresh token presented twice: alpha: r1" in tally.lines()

    def test_a_run_with_no_verdict_fails(self) -> None:
        """A fleet that never came up is a FAIL that says why, not a pass with nothing judged."""
        tally = Tally(seed=7, problems=["the fleet did not come up: h0 (exit status 78)"])
        assert not tally.ok and tally.lines()[-1] == "FAIL (2 findings)"


@pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)
@pytest.mark.skipif(not FLEET_DAEMON, reason="the daemon's fleet wiring is not on this branch")
class TestShortCampaign:
    def test_one_round_of_every_fault_loses_nothing(self) -> None:
        """Every fault once: no token spent twice, no chain lost, every judged read valid."""
        tally = run_campaign(len(PLAN), seed=13)
        assert tally.ok, "\n".join(tally.lines())
        assert tally.verdict is not None and tally.verdict.reads_judged > 0

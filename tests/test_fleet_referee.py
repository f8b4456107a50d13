"""The fleet campaign's referee (tests/fleet_referee.py), judged on hand-made runs."""

from __future__ import annotations

import requests

from aac_tokend.core.state import RejectionReason
from aac_tokend.core.tokens import token_hash
from aac_tokend.sandbox.server import SandboxServer

from .fleet_referee import Read, Reported, Verdict, Violation, Window, judge_run

CLIENT = "aac-sandbox-client"


class Log:
    """A sandbox log written by hand: one family per profile, tokens named r0, r1, ..."""

    def __init__(self) -> None:
        self.entries: list[dict[str, object]] = []
        self.imported: dict[str, list[str]] = {}

    def family(self, profile: str) -> None:
        """A new family for ``profile`` (a fresh import), its first token r0."""
        count = len(self.imported.get(profile, [])) + 1
        self.imported.setdefault(profile, []).append(f"{profile}-{count}-r0")

    def rt(self, profile: str, n: int) -> str:
        """Token rN of the profile's latest family."""
        return f"{profile}-{len(self.imported[profile])}-r{n}"

    def present(self, profile: str, n: int, outcome: str, at: float) -> None:
        """Token rN of the profile's family presented at ``at``, with the sandbox's outcome."""
        spent = outcome in ("rotated", "dropped_after_rotation", "failed_after_rotation")
        self.entries.append(
            {
                "seq": len(self.entries) + 1,
                "at": at,
                "rt_hash": self.rt(profile, n),
                "client_id": CLIENT,
                "outcome": outcome,
                "new_rt_hash": self.rt(profile, n + 1) if spent else None,
                "family": f"fam-{profile}-{len(self.imported[profile])}",
            }
        )

    def judge(
        self,
        reads: list[Read] | None = None,
        reported: list[Reported] | None = None,
        residual: list[Window] | None = None,
        replacing: list[tuple[str, Window]] | None = None,
    ) -> Verdict:
        found = (reads or [], reported or [], residual or [], replacing or [])
        return judge_run(self.entries, self.imported, *found)


def kinds(verdict: Verdict) -> list[Violation]:
    return [f.violation for f in verdict.findings]


def rotating(profile: str = "alpha", count: int = 3) -> Log:
    log = Log()
    log.family(profile)
    for n in range(count):
        log.present(profile, n, "rotated", 100.0 + n)
    return log


class TestCleanRuns:
    def test_a_chain_that_only_rotates_passes(self) -> None:
        """Rotations alone, with every read valid, are a pass, and counted."""
        log = rotating(count=4)
        reads = [Read(100.5, "h0", "alpha", 120.0, True), Read(101.0, "h1", "alpha", 120.0, True)]
        verdict = log.judge(reads)
        assert verdict.ok, verdict.lines()
        assert (verdict.presentations, verdict.rotations, verdict.reads_judged) == (4, 4, 2)

    def test_a_failed_request_does_not_spend_its_token(self) -> None:
        """A token refused by an injected failure may be presented again: it was not spent."""
        log = rotating(count=1)
        log.present("alpha", 1, "failed_injected", 102.0)
        log.present("alpha", 1, "rotated", 103.0)
        assert log.judge().ok

    def test_requests_of_other_families_are_not_judged(self) -> None:
        """Log entries of a family nobody imported in this run are not this run's chains."""
        log = rotating(count=2)
        log.entries.append(dict(log.entries[0], family="somebody-else", rt_hash="x"))
        log.entries.append(dict(log.entries[0], family="somebody-else", rt_hash="x"))
        assert log.judge().ok

    def test_every_family_of_a_profile_is_judged(self) -> None:
        """A profile imported twice (after a loss) has both families judged."""
        log = rotating(count=1)
        log.family("alpha")
        log.present("alpha", 0, "rotated", 110.0)
        log.present("alpha", 0, "reuse_revoked", 111.0)
        assert kinds(log.judge()) == [Violation.SENT_TWICE]


class TestSentTwice:
    def test_a_reuse_with_no_report_is_a_finding(self) -> None:
        """A spent token presented again, with nobody reporting it, is a double spend."""
        log = rotating(count=2)
        log.present("alpha", 1, "reuse_revoked", 103.0)
        verdict = log.judge()
        assert kinds(verdict) == [Violation.SENT_TWICE]
        assert "alpha" in str(verdict.findings[0]) and "seq 3" in str(verdict.findings[0])

    def test_a_dropped_answer_spent_the_token(self) -> None:
        """A rotation whose answer was dropped spent the token: presenting it again is a reuse."""
        log = rotating(count=1)
        log.present("alpha", 1, "dropped_after_rotation", 102.0)
        log.present("alpha", 1, "reuse_revoked", 103.0)
        assert kinds(log.judge()) == [Violation.SENT_TWICE]

    def test_a_residual_after_lost_response_explains_one_reuse(self) -> None:
        """A reported after_lost_response, first presentation inside a residual window: excused."""
        log = rotating(count=2)
        log.present("alpha", 1, "reuse_revoked", 110.0)
        report = Reported("alpha", RejectionReason.AFTER_LOST_RESPONSE, 110.1)
        verdict = log.judge(reported=[report], residual=[Window(100.5, 108.0)])
        assert verdict.ok, verdict.lines()
        assert verdict.excused_reuses == 1

    def test_after_lost_response_outside_a_residual_case_is_no_excuse(self) -> None:
        """The same report with the first presentation outside every residual window: a finding."""
        log = rotating(count=2)
        log.present("alpha", 1, "reuse_revoked", 110.0)
        report = Reported("alpha", RejectionReason.AFTER_LOST_RESPONSE, 110.1)
        verdict = log.judge(reported=[report], residual=[Window(104.0, 108.0)])
        assert kinds(verdict) == [Violation.SENT_TWICE, Violation.CHAIN_LOST]

    def test_a_report_for_another_profile_is_no_excuse(self) -> None:
        """An after_lost_response of beta does not explain a reuse of alpha's chain."""
        log = rotating(count=2)
        log.present("alpha", 1, "reuse_revoked", 110.0)
        report = Reported("beta", RejectionReason.AFTER_LOST_RESPONSE, 110.1)
        verdict = log.judge(reported=[report], residual=[Window(100.0, 108.0)])
        assert Violation.SENT_TWICE in kinds(verdict)

    def test_a_report_older_than_the_answer_is_no_excuse(self) -> None:
        """A rejection reported before the token was first presented cannot be about it."""
        log = rotating(count=2)
        log.present("alpha", 1, "reuse_revoked", 110.0)
        report = Reported("alpha", RejectionReason.AFTER_LOST_RESPONSE, 99.0)
        verdict = log.judge(reported=[report], residual=[Window(100.0, 108.0)])
        assert Violation.SENT_TWICE in kinds(verdict)

    def test_one_report_explains_one_reuse(self) -> None:
        """Two lost chains and one report: the second reuse is still a finding."""
        log = rotating("alpha", 2)
        log.family("beta")
        log.present("beta", 0, "rotated", 101.0)
        log.present("alpha", 1, "reuse_revoked", 110.0)
        log.present("beta", 0, "reuse_revoked", 110.0)
        reports = [
            Reported("alpha", RejectionReason.AFTER_LOST_RESPONSE, 110.1),
            Reported("alpha", RejectionReason.AFTER_LOST_RESPONSE, 110.2),
        ]
        verdict = log.judge(reported=reports, residual=[Window(100.0, 108.0)])
        assert kinds(verdict) == [Violation.SENT_TWICE, Violation.CHAIN_LOST]
        assert "beta" in str(verdict.findings[0])

    def test_a_dead_familys_later_requests_are_not_more_findings(self) -> None:
        """Hosts presenting tokens of a family already revoked add nothing to the one reuse."""
        log = rotating(count=2)
        log.present("alpha", 1, "reuse_revoked", 110.0)
        log.present("alpha", 2, "revoked", 111.0)
        log.present("alpha", 1, "revoked", 112.0)
        assert kinds(log.judge()) == [Violation.SENT_TWICE]


class TestChainsLost:
    def test_a_reported_rejection_is_a_lost_chain(self) -> None:
        """A host reporting reuse_suspected gave the chain up: a finding even with a clean log."""
        log = rotating(count=2)
        report = Reported("alpha", RejectionReason.REUSE_SUSPECTED, 104.0)
        verdict = log.judge(reported=[report])
        assert kinds(verdict) == [Violation.CHAIN_LOST]
        assert "reuse_suspected" in str(verdict.findings[0])

    def test_an_unused_after_lost_response_is_a_lost_chain(self) -> None:
        """after_lost_response with no reuse in the log: a host gave up a chain that was alive."""
        log = rotating(count=2)
        report = Reported("alpha", RejectionReason.AFTER_LOST_RESPONSE, 104.0)
        assert kinds(log.judge(reported=[report], residual=[Window(0, 1e9)])) == [
            Violation.CHAIN_LOST
        ]

    def test_a_family_revoked_without_a_reuse_is_lost(self) -> None:
        """The current token refused as revoked (or expired): the chain is lost."""
        log = rotating(count=2)
        log.present("alpha", 2, "expired", 104.0)
        verdict = log.judge()
        assert kinds(verdict) == [Violation.CHAIN_LOST]
        assert "expired" in str(verdict.findings[0])


class TestReads:
    def test_no_token_while_a_quorum_was_up_is_a_finding(self) -> None:
        """A read that got no token while the host could reach a quorum breaks the promise."""
        verdict = rotating().judge([Read(101.0, "h2", "alpha", None, True)])
        assert kinds(verdict) == [Violation.NO_TOKEN]
        assert "h2/alpha" in str(verdict.findings[0])

    def test_an_expired_token_is_a_finding(self) -> None:
        """A token served at or past its exp is not valid."""
        verdict = rotating().judge([Read(101.0, "h1", "alpha", 101.0, True)])
        assert kinds(verdict) == [Violation.EXPIRED_TOKEN]

    def test_reads_without_a_quorum_are_not_judged(self) -> None:
        """With no quorum reachable a host may run dry: those reads are counted, not judged."""
        verdict = rotating().judge([Read(101.0, "h1", "alpha", None, False)])
        assert verdict.ok
        assert (verdict.reads_judged, verdict.reads_excused) == (0, 1)

    def test_reads_while_a_lost_chain_is_replaced_are_not_judged(self) -> None:
        """A profile waiting for its new import may serve nothing; other profiles are judged."""
        reads = [Read(105.0, "h0", "alpha", None, True), Read(105.0, "h0", "beta", None, True)]
        verdict = rotating().judge(reads, replacing=[("alpha", Window(104.0, 106.0))])
        assert kinds(verdict) == [Violation.NO_TOKEN] and "h0/beta" in str(verdict.findings[0])
        assert (verdict.reads_judged, verdict.reads_excused) == (1, 1)

    def test_bad_reads_are_summed_per_host(self) -> None:
        """Many failed reads of one host make one finding that counts them."""
        reads = [Read(100.0 + i / 10, "h0", "alpha", None, True) for i in range(50)]
        reads.append(Read(100.0, "h1", "alpha", None, True))
        verdict = rotating().judge(reads)
        assert len(verdict.findings) == 2
        assert "50 reads" in str(verdict.findings[0]) and "47 more" in str(verdict.findings[0])


class TestTheRealSandboxLog:
    def test_a_real_reuse_is_seen_in_the_sandboxs_own_log(self) -> None:
        """The referee reads the sandbox's log as it is: a token posted twice is found."""
        with SandboxServer() as sandbox:
            pair = sandbox.generate()
            form = {
                "grant_type": "refresh_token",
                "refresh_token": str(pair["refresh_token"]),
                "client_id": sandbox.client_id,
            }
            for _ in range(2):
                requests.post(sandbox.token_endpoint, data=form, timeout=10)
            first = token_hash(str(pair["refresh_token"]))
            verdict = judge_run(sandbox.log(), {"alpha": [first]}, [], [])
        assert kinds(verdict) == [Violation.SENT_TWICE]
        assert verdict.rotations == 1

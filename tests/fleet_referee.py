"""The fleet campaign's referee: a pure judgement of one run (tests/fleet_campaign.py).

It reads three accounts, none of them the daemons' own view of their chains:

- the sandbox's request log (every refresh token presented, by hash, and what came of it),
  grouped per family by ``crash_rig.chains`` from the refresh tokens each profile was
  imported with;
- the readers' records: each host's token socket polled, with the token's ``exp`` (None: no
  token) and whether that host could reach an etcd quorum at that moment;
- the rejections the hosts reported (the chain record's ``rejection``), and the windows in
  which the campaign destroyed an answer in a way that loses it by design: an owner cut off
  from etcd for longer than W after the server answered (issue #13's first residual case), or
  the courier SIGKILLed between the answer and its outcome commit (the one process holding
  the new pair died with it, as on a single host: README "Reliability").

The rules, issue #13's acceptance: 0 refresh tokens presented twice unless a reported
``after_lost_response`` explains it and its first presentation lies in such a window;
0 chains lost otherwise (a family revoked, or a rejection reported, with no such excuse);
a valid token (by its ``exp``) on every host for every read made while a quorum was up.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aac_tokend.core.state import RejectionReason

from .crash_rig import chains

__all__ = [
    "Finding",
    "Outcome",
    "Read",
    "Reported",
    "Verdict",
    "Violation",
    "Window",
    "judge_run",
]

#: Findings of one kind on one host are summed into one line, with this many times shown.
_SHOWN_TIMES = 3


class Outcome(enum.StrEnum):
    """What the sandbox did with one token request (its log's ``outcome``)."""

    ROTATED = "rotated"
    REUSE_REVOKED = "reuse_revoked"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"
    INVALID_CLIENT = "invalid_client"
    INVALID_REQUEST = "invalid_request"
    FAILED_INJECTED = "failed_injected"
    DROPPED_AFTER_ROTATION = "dropped_after_rotation"
    FAILED_AFTER_ROTATION = "failed_after_rotation"

    @property
    def spends(self) -> bool:
        """True if the token presented was spent: the family moved on to a new one."""
        return self in _SPENDING

    @property
    def ends_family(self) -> bool:
        """True if the family is dead after this answer (revoked, or it was already)."""
        return self in _ENDING


_SPENDING = frozenset(
    {Outcome.ROTATED, Outcome.DROPPED_AFTER_ROTATION, Outcome.FAILED_AFTER_ROTATION}
)
_ENDING = frozenset({Outcome.REUSE_REVOKED, Outcome.REVOKED, Outcome.EXPIRED})


class Violation(enum.Enum):
    """The rules a run can break, each worded for the report."""

    SENT_TWICE = "a refresh token presented twice"
    CHAIN_LOST = "a chain lost"
    NO_TOKEN = "no token served while a quorum was up"
    EXPIRED_TOKEN = "an expired token served while a quorum was up"


@dataclass(frozen=True)
class Finding:
    """One broken rule, with what the referee saw."""

    violation: Violation
    detail: str

    def __str__(self) -> str:
        return f"{self.violation.value}: {self.detail}"


@dataclass(frozen=True)
class Read:
    """One poll of one host's token socket."""

    at: float  # wall clock, as the sandbox's ``at`` and the tokens' ``exp``
    host: str
    profile: str
    exp: float | None  # the served token's exp; None: no token (refused, or no answer)
    quorum: bool  # this host could reach an etcd quorum (and had settled after a fault)

    @property
    def valid(self) -> bool:
        """A token was served, and it had not expired by its own ``exp``."""
        return self.exp is not None and self.exp > self.at


@dataclass(frozen=True)
class Reported:
    """A rejection a host reported for a profile's chain."""

    profile: str
    reason: RejectionReason
    at: float


@dataclass(frozen=True)
class Window:
    """A time span (wall clock) in which the campaign destroyed an answer (module docstring)."""

    start: float
    end: float

    def holds(self, at: float) -> bool:
        return self.start <= at <= self.end


@dataclass(frozen=True)
class Verdict:
    """What the referee found, and what it counted."""

    findings: tuple[Finding, ...]
    presentations: int
    rotations: int
    excused_reuses: int
    reads_judged: int
    reads_excused: int

    @property
    def ok(self) -> bool:
        return not self.findings

    def lines(self) -> list[str]:
        """The verdict for the campaign's report."""
        return [
            f"referee: {self.presentations} token requests, {self.rotations} rotations, "
            f"{self.excused_reuses} reuses explained by an answer lost by design",
            f"readers: {self.reads_judged} reads while a quorum was up (all must hold a valid "
            f"token), {self.reads_excused} not judged (no quorum, or a lost chain replaced)",
            *(f"FINDING: {f}" for f in self.findings),
        ]


def judge_run(
    log: Sequence[dict[str, Any]],
    imported: Mapping[str, Sequence[str]],
    reads: Sequence[Read],
    reported: Sequence[Reported],
    residual: Sequence[Window] = (),
    replacing: Sequence[tuple[str, Window]] = (),
) -> Verdict:
    """Judge one run: ``imported`` maps each profile to the first rt hash of each family;
    ``replacing`` the spans in which a profile had a lost chain and waited for its new import
    (its reads then are not judged: the loss itself is judged, once)."""
    findings: list[Finding] = []
    excuses = [r for r in reported if r.reason is RejectionReason.AFTER_LOST_RESPONSE]
    unexplained = [r for r in reported if r.reason is not RejectionReason.AFTER_LOST_RESPONSE]
    profile_of = {first: p for p, firsts in imported.items() for first in firsts}
    firsts = list(profile_of)
    excused = rotations = presentations = 0
    for chain in chains(log, firsts):
        profile = profile_of[chain.first_rt_hash]
        first_at: dict[str, float] = {}
        lost = False
        presentations += len(chain.entries)
        for entry in chain.entries:
            if lost:
                break  # a dead family's later requests are its holders finding out
            outcome = Outcome(str(entry["outcome"]))
            rt_hash, at = str(entry["rt_hash"]), float(str(entry["at"]))
            rotations += outcome is Outcome.ROTATED
            if rt_hash in first_at:
                excuse = _excuse(excuses, residual, profile, first_at[rt_hash])
                if excuse is None:
                    findings.append(
                        Finding(
                            Violation.SENT_TWICE,
                            f"{profile}: refresh token {rt_hash} (seq {entry['seq']}, first "
                            f"presented {at - first_at[rt_hash]:.2f} s earlier)",
                        )
                    )
                else:
                    excuses.remove(excuse)
                    excused += 1
                lost = True
            elif outcome.spends:
                first_at[rt_hash] = at
            elif outcome.ends_family:
                findings.append(
                    Finding(Violation.CHAIN_LOST, f"{profile}: family ended {outcome.value}")
                )
                lost = True
    # An after_lost_response that no residual reuse used up is a host giving up a chain.
    for r in [*unexplained, *excuses]:
        findings.append(
            Finding(Violation.CHAIN_LOST, f"{r.profile}: reported {r.reason.value} at {r.at:.2f}")
        )
    judged = [
        r
        for r in reads
        if r.quorum and not any(p == r.profile and w.holds(r.at) for p, w in replacing)
    ]
    findings += _read_findings(judged)
    return Verdict(
        findings=tuple(findings),
        presentations=presentations,
        rotations=rotations,
        excused_reuses=excused,
        reads_judged=len(judged),
        reads_excused=len(reads) - len(judged),
    )


def _excuse(
    excuses: Sequence[Reported], residual: Sequence[Window], profile: str, first_at: float
) -> Reported | None:
    """The report that explains a reuse whose first presentation was at ``first_at``."""
    if not any(w.holds(first_at) for w in residual):
        return None
    for r in excuses:
        if r.profile == profile and r.at >= first_at:
            return r
    return None


def _read_findings(judged: Sequence[Read]) -> list[Finding]:
    """One finding per (host, profile, violation), counting its reads and showing a few."""
    bad: dict[tuple[str, str, Violation], list[float]] = {}
    for r in judged:
        if not r.valid:
            kind = Violation.NO_TOKEN if r.exp is None else Violation.EXPIRED_TOKEN
            bad.setdefault((r.host, r.profile, kind), []).append(r.at)
    out = []
    for (host, profile, kind), times in bad.items():
        shown = ", ".join(f"{t:.2f}" for t in times[:_SHOWN_TIMES])
        more = f" and {len(times) - _SHOWN_TIMES} more" if len(times) > _SHOWN_TIMES else ""
        out.append(Finding(kind, f"{host}/{profile}: {len(times)} reads (at {shown}{more})"))
    return out

"""The fleet campaign (``make fleet-crash``): faults against three hosts sharing chains on etcd.

    python -m tests.fleet_campaign --faults 200 [--seed S] [--profiles 2]

The rig (tests/fleet_rig.py) runs a 3-member etcd cluster, the sandbox (30 s access tokens,
answer delays drawn per fault) and three ``aac-tokend run`` daemons as three hosts, each
reaching etcd through a link of its own that can be cut. Every fault is aimed at the owner of
a profile (etcd's owner key says which host that is), most at a step of its courier's
transaction, which the rig sees from outside: REQUESTED (a refresh was asked for: before the
journal commit), JOURNALED (the chain record holds an unresolved entry: between commit and
send), ANSWERED (the sandbox logged the request and is holding its answer: between answer and
outcome commit), or ANY moment. The faults, in turn (``PLAN``): SIGKILL of the owner's
daemon and of its courier; SIGSTOP of either for longer than the lease; the owner cut off
from etcd for longer than the lease (some cuts outlast W after an answer: issue #13's first
residual case, whose windows the referee is told); etcd's reply to the owner's next write
dropped after etcd applied it; the etcd leader killed mid-refresh; one member, then two.

After each fault every member and daemon is back and each profile has an owner again; a
rejection a host reported is collected and the chain imported anew. Readers poll every
host's token socket all along. The referee (tests/fleet_referee.py) judges the sandbox's
request log, the reads and the reported rejections. Exit status 1 on any finding.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import itertools
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aac_tokend.core.tokens import token_hash

from .crash_rig import Rig, wait_for
from .fleet_referee import Reported, Verdict, Window, judge_run
from .fleet_rig import FLEET_TIMINGS, FleetRig, Host

__all__ = ["Fault", "Step", "Tally", "main", "run_campaign"]

LEASE = float(FLEET_TIMINGS["lease_ttl_seconds"])
W = float(FLEET_TIMINGS["resolve_wait_seconds"])
#: Pauses and cuts last past the lease, so that another host takes over meanwhile.
HOLD_SECONDS = (LEASE + 0.5, LEASE + 2.0, W - 1.0)
#: A cut this long after an answer is the first residual case (W, with a second to spare).
RESIDUAL_HOLD = W + 1.5
#: Share of answer-step cuts made residual: enough to see them explained, rare as in life.
RESIDUAL_SHARE = 0.25
#: Answer delays drawn per fault: the wider, the more faults land inside the answer window.
ANSWER_DELAYS = (0.0, 0.1, 0.4)
#: How long a step is waited for before the fault is applied anyway (and counted a miss).
STEP_TIMEOUT = 8.0
POLL = 0.01


class Step(enum.Enum):
    """Where in the owner courier's transaction a fault lands."""

    ANY = "anywhere"
    REQUESTED = "before the journal commit"
    JOURNALED = "between commit and send"
    ANSWERED = "between answer and outcome commit"


class Fault(enum.Enum):
    KILL_DAEMON = "SIGKILL owner daemon"
    KILL_COURIER = "SIGKILL owner courier"
    STOP_DAEMON = "SIGSTOP owner daemon"
    STOP_COURIER = "SIGSTOP owner courier"
    CUT = "cut owner from etcd"
    DROP_REPLY = "drop etcd write reply"
    KILL_LEADER = "kill etcd leader"
    KILL_MEMBERS = "kill one member, then two"


#: Every fault with the steps it is aimed at, taken in turn.
PLAN: tuple[tuple[Fault, Step], ...] = (
    *((Fault.KILL_DAEMON, s) for s in (Step.ANY, Step.JOURNALED, Step.ANSWERED)),
    *((Fault.KILL_COURIER, s) for s in (Step.JOURNALED, Step.ANSWERED, Step.ANY)),
    *((Fault.STOP_DAEMON, s) for s in (Step.REQUESTED, Step.JOURNALED, Step.ANSWERED)),
    *((Fault.STOP_COURIER, s) for s in (Step.REQUESTED, Step.JOURNALED, Step.ANSWERED)),
    *((Fault.CUT, s) for s in (Step.REQUESTED, Step.JOURNALED, Step.ANSWERED)),
    (Fault.DROP_REPLY, Step.REQUESTED),
    (Fault.KILL_LEADER, Step.JOURNALED),
    (Fault.KILL_MEMBERS, Step.ANY),
)


@dataclass
class Tally:
    """What was done, what landed where, and the referee's verdict."""

    seed: int
    applied: Counter[tuple[Fault, Step]] = field(default_factory=Counter)
    missed: Counter[tuple[Fault, Step]] = field(default_factory=Counter)  # step not seen
    reported: list[Reported] = field(default_factory=list)
    residual: list[Window] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    verdict: Verdict | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and self.verdict is not None and self.verdict.ok

    def lines(self) -> list[str]:
        out = [f"aac-tokend fleet campaign (seed {self.seed})"]
        for (fault, step), n in sorted(self.applied.items(), key=lambda kv: kv[0][0].name):
            missed = self.missed[(fault, step)]
            note = f" ({missed} missed the step)" if missed else ""
            out.append(f"  {fault.value} {step.value}: {n}{note}")
        out.append(
            f"faults: {sum(self.applied.values())}, residual cuts (> W after an answer): "
            f"{len(self.residual)}, rejections reported: {len(self.reported)}"
        )
        out += self.verdict.lines() if self.verdict else ["referee: no verdict (the run broke)"]
        out.append(f"duration: {self.seconds:.0f} s")
        out += [f"FINDING: {p}" for p in self.problems]
        count = len(self.problems) + (len(self.verdict.findings) if self.verdict else 1)
        out.append("PASS" if self.ok else f"FAIL ({count} findings)")
        return out


def _poll(check: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(POLL)
    return False


def _reach(rig: FleetRig, owner: Host, profile: str, step: Step, rng: random.Random) -> bool:
    """Ask the owner for a refresh and wait until its courier is at ``step``; False: missed."""
    record = rig.record(profile)
    token = record.state.refresh_token if record else None
    old = token_hash(token) if token else ""
    seen = len(rig.sandbox.log())
    owner.rig.refresh_in_background(profile)
    if step is Step.ANY:
        time.sleep(rng.uniform(0.0, 1.0))
        return True
    if step is Step.REQUESTED:
        return True
    if step is Step.JOURNALED:
        return _poll(lambda: (r := rig.record(profile)) is not None and r.unresolved, STEP_TIMEOUT)
    return _poll(lambda: any(e["rt_hash"] == old for e in rig.sandbox.log()[seen:]), STEP_TIMEOUT)


def apply_fault(rig: FleetRig, fault: Fault, step: Step, rng: random.Random, tally: Tally) -> None:
    """One fault aimed at a random profile's owner, at ``step``."""
    profile = rng.choice(sorted(rig.imported))
    owner = rig.wait_owner(profile)
    rig.sandbox.set_answer_delay(rng.choice(ANSWER_DELAYS) if step is not Step.ANSWERED else 0.4)
    tally.applied[(fault, step)] += 1
    if fault is Fault.DROP_REPLY:
        owner.link.drop_writes(1)
    if fault is Fault.KILL_MEMBERS:
        rig.kill_members(1)
        time.sleep(rng.uniform(0.5, LEASE))
        rig.kill_members(1)
        time.sleep(rng.uniform(LEASE, W))
        rig.restore_members()
        return
    if not _reach(rig, owner, profile, step, rng):
        tally.missed[(fault, step)] += 1
    hold = rng.choice(HOLD_SECONDS)
    if fault is Fault.KILL_DAEMON:
        rig.kill_daemon(owner)
    elif fault in (Fault.KILL_COURIER, Fault.STOP_COURIER):
        couriers = rig.couriers(owner)
        if not couriers:
            tally.missed[(fault, step)] += 1
        elif fault is Fault.KILL_COURIER:
            with contextlib.suppress(ProcessLookupError):  # it may have finished meanwhile
                os.kill(couriers[0], signal.SIGKILL)
        else:
            with rig.paused(owner, couriers[0]):
                time.sleep(hold)
    elif fault is Fault.STOP_DAEMON:
        assert owner.daemon is not None
        with rig.paused(owner, owner.daemon.pid):
            time.sleep(hold)
    elif fault is Fault.CUT:
        residual = step is Step.ANSWERED and rng.random() < RESIDUAL_SHARE
        start = time.time()
        with rig.cut_off(owner):
            time.sleep(RESIDUAL_HOLD if residual else hold)
        if residual:
            # The answered request came at most one answer delay (0.4 s) before the cut.
            tally.residual.append(Window(start - 1.0, time.time()))
    elif fault is Fault.KILL_LEADER:
        rig.kill_members(1)
        time.sleep(rng.uniform(0.5, LEASE))
        rig.restore_members()


def recover(rig: FleetRig, tally: Tally) -> None:
    """Every daemon running, every profile owned; rejections collected, lost chains replaced."""
    for host in rig.hosts:
        if host.daemon is None or host.daemon.poll() is not None:
            status = None if host.daemon is None else host.daemon.returncode
            tally.problems.append(f"{host.name}'s daemon ended by itself (status {status})")
            host.start()
            host.unsettle()
        host.rig.reap()
    for profile in sorted(rig.imported):
        rig.wait_owner(profile)
        record = rig.record(profile)
        rejection = record.state.rejection if record else None
        if rejection is not None:
            tally.reported.append(Reported(profile, rejection.reason, rejection.at))
            rig.import_profile(profile)


def _owned(rig: FleetRig, profile: str) -> bool:
    """True once the profile has an owner; AssertionError at once if every daemon has ended."""
    if all(h.daemon is not None and h.daemon.poll() is not None for h in rig.hosts):
        raise AssertionError("every daemon has ended")
    return rig.owner(profile) is not None


def _start(rig: FleetRig, profiles: Sequence[str]) -> str | None:
    """Import the profiles and start the daemons; why the run cannot go on, else None."""
    for profile in profiles:
        rig.import_profile(profile)
    rig.start_daemons()
    try:
        for profile in profiles:
            wait_for(f"an owner of {profile}", functools.partial(_owned, rig, profile), 30)
        for host, profile in itertools.product(rig.hosts, profiles):
            serves = functools.partial(host.rig.served_token, profile)
            wait_for(f"{host.name} to serve {profile}", serves, 30)
    except AssertionError as exc:
        tails = []
        for host in rig.hosts:
            status = host.daemon.poll() if host.daemon else None
            last = host.rig.daemon_log().strip().splitlines()[-1:] or ["(no log)"]
            tails.append(f"{host.name} (exit status {status}): {last[0][:300]}")
        return f"the fleet did not come up: {exc}; " + "; ".join(tails)
    return None


def run_campaign(faults: int, seed: int, profiles: int = 2) -> Tally:
    """Start the fleet, apply ``faults`` faults in turn, judge the run."""
    started = time.monotonic()
    rng = random.Random(seed)
    tally = Tally(seed=seed)
    names = ["alpha", "beta", "gamma"][:profiles]
    rig = FleetRig()
    try:
        broken = _start(rig, names)
        if broken:
            tally.problems.append(broken)
            return tally
        with rig.reading(names) as reads:
            for fault, step in itertools.islice(itertools.cycle(PLAN), faults):
                apply_fault(rig, fault, step, rng, tally)
                recover(rig, tally)
            rig.sandbox.set_answer_delay(0.0)
            time.sleep(W)  # one more round of refreshes, fault-free
            recover(rig, tally)
        for host in rig.hosts:
            if host.daemon is not None:
                Rig.stop(host.daemon)
        tally.verdict = judge_run(
            rig.sandbox.log(), rig.imported, reads, tally.reported, tally.residual
        )
    finally:
        rig.close()
        tally.seconds = time.monotonic() - started
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fleet_campaign",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--faults", type=int, default=200, help="faults applied (default 200)")
    parser.add_argument("--seed", type=int, help="random seed (default: from the clock)")
    parser.add_argument("--profiles", type=int, choices=(1, 2, 3), default=2)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    tally = run_campaign(args.faults, seed, args.profiles)
    print("\n".join(tally.lines()), flush=True)
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())

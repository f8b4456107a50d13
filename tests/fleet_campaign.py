"""The fleet campaign (``make fleet-crash``): faults against three hosts sharing chains on etcd.

    python -m tests.fleet_campaign --faults 200 [--seed S] [--profiles 2]

The rig (tests/fleet_rig.py) runs a 3-member etcd cluster, the sandbox (30 s access tokens,
answer delays drawn per fault) and three ``aac-tokend run`` daemons as three hosts, each
reaching etcd through a link of its own that can be cut. The faults (tests/fleet_faults.py)
are aimed at a profile's owner, most at a step of its courier's transaction, every kind in
turn: SIGKILL and SIGSTOP of the owner's daemon and courier, the owner cut off from etcd,
etcd's reply to a write dropped, the leader killed, one member then two killed.

After each fault every member and daemon is back, each profile has an owner again and its
journal is resolved; a rejection a host reported is collected and the chain imported anew.
Readers poll every host's token socket all along. The referee (tests/fleet_referee.py) judges
the sandbox's request log, the reads and the reported rejections. Exit status 1 on a finding.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .crash_rig import Rig, wait_for
from .fleet_faults import PLAN, Fault, Step, apply_fault, poll
from .fleet_referee import Reported, Verdict, Window, judge_run
from .fleet_rig import FLEET_TIMINGS, FleetRig, Host

__all__ = ["Tally", "main", "run_campaign"]

#: An heir resolves an inherited entry W after it first saw it, once it owns the chain (a
#: lease TTL after the owner died), and retries within the request deadline: with room to spare.
RESOLVE_TIMEOUT = (
    FLEET_TIMINGS["lease_ttl_seconds"]
    + FLEET_TIMINGS["resolve_wait_seconds"]
    + FLEET_TIMINGS["request_deadline_seconds"]
    + 10.0
)


@dataclass
class Tally:
    """What was done, what landed where, and the referee's verdict."""

    seed: int
    applied: Counter[tuple[Fault, Step]] = field(default_factory=Counter)
    missed: Counter[tuple[Fault, Step]] = field(default_factory=Counter)  # step not seen
    reported: list[Reported] = field(default_factory=list)
    residual: list[Window] = field(default_factory=list)
    replacing: list[tuple[str, Window]] = field(default_factory=list)
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
            f"faults: {sum(self.applied.values())}, answers lost by design (a courier killed "
            f"after it, or its owner cut off > W): "
            f"{len(self.residual)}, rejections reported: {len(self.reported)}"
        )
        out += self.verdict.lines() if self.verdict else ["referee: no verdict (the run broke)"]
        out.append(f"duration: {self.seconds:.0f} s")
        out += [f"FINDING: {p}" for p in self.problems]
        count = len(self.problems) + (len(self.verdict.findings) if self.verdict else 1)
        out.append("PASS" if self.ok else f"FAIL ({count} findings)")
        return out


def recover(rig: FleetRig, tally: Tally) -> None:
    """Every daemon running, every profile owned and its journal resolved (so that what a
    fault did is settled before the next); rejections collected, lost chains imported anew."""
    for host in rig.hosts:
        if host.daemon is None or host.daemon.poll() is not None:
            status = None if host.daemon is None else host.daemon.returncode
            tally.problems.append(f"{host.name}'s daemon ended by itself (status {status})")
            host.start()
        host.rig.reap()
    for profile in sorted(rig.imported):
        # etcd names the owner until its lease runs out, even when its daemon was killed;
        # the next fault must be aimed at a daemon that knows it owns the chain.
        if not poll(functools.partial(_owner_knows, rig, profile), RESOLVE_TIMEOUT):
            tally.problems.append(f"{profile}: no daemon owns it {RESOLVE_TIMEOUT} s on")
        if not poll(functools.partial(_resolved, rig, profile), RESOLVE_TIMEOUT):
            tally.problems.append(f"{profile}: a journal entry unresolved {RESOLVE_TIMEOUT} s on")
        record = rig.record(profile)
        rejection = record.state.rejection if record else None
        if rejection is not None:
            tally.reported.append(Reported(profile, rejection.reason, rejection.at))
            rig.import_profile(profile)
            for host in rig.hosts:
                wait_for(f"{host.name} to serve {profile} again", serving(host, profile), 30)
            tally.replacing.append((profile, Window(rejection.at - 1.0, time.time())))


def _owner_knows(rig: FleetRig, profile: str) -> bool:
    """True if the host etcd names as the owner says so itself (its status row's role)."""
    host = rig.owner(profile)
    try:
        rows = host.rig.control("status", timeout=2.0)["profiles"] if host else []
    except (OSError, ValueError):
        return False
    mine = [r for r in cast(list[dict[str, Any]], rows) if r["profile"] == profile]
    return [(r.get("fleet") or {}).get("role") for r in mine] == ["owner"]


def serving(host: Host, profile: str) -> Callable[[], str]:
    """What polls the host's token socket for ``profile`` ("" while it serves none)."""
    return functools.partial(host.rig.served_token, profile)


def _resolved(rig: FleetRig, profile: str) -> bool:
    record = rig.record(profile)
    return record is None or record.unresolved is None


def _owned(rig: FleetRig, profile: str) -> bool:
    """True once the profile has an owner; AssertionError at once if every daemon has ended."""
    if all(h.daemon is not None and h.daemon.poll() is not None for h in rig.hosts):
        raise AssertionError("every daemon has ended")
    return rig.owner(profile) is not None


def _start(rig: FleetRig, profiles: Sequence[str]) -> str | None:
    """Import the profiles and start the daemons; why the run cannot go on, else None."""
    for profile in profiles:
        rig.import_profile(profile)
    try:
        for host in rig.hosts:
            host.start()
        for profile in profiles:
            wait_for(f"an owner of {profile}", functools.partial(_owned, rig, profile), 30)
        for host, profile in itertools.product(rig.hosts, profiles):
            wait_for(f"{host.name} to serve {profile}", serving(host, profile), 30)
    except AssertionError as exc:
        tails = []
        for host in rig.hosts:
            status = host.daemon.poll() if host.daemon else None
            last = host.rig.daemon_log().strip().splitlines()[-1:] or ["(no log)"]
            tails.append(f"{host.name} (exit status {status}): {last[0][:300]}")
        return f"the fleet did not come up: {exc}; " + "; ".join(tails)
    return None


def run_campaign(faults: int, seed: int, profiles: int = 2, logs: Path | None = None) -> Tally:
    """Start the fleet, apply ``faults`` faults in turn, judge the run; with ``logs``, keep
    every daemon's log and the sandbox's request log there (the homes are removed)."""
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
            for n, (fault, step) in enumerate(itertools.islice(itertools.cycle(PLAN), faults)):
                began, wall = time.monotonic(), time.time()  # wall: to match the findings
                landed = apply_fault(rig, fault, step, rng)
                tally.applied[(fault, step)] += 1
                tally.missed[(fault, step)] += not landed.reached
                if landed.lost_answer:
                    tally.residual.append(landed.lost_answer)
                recover(rig, tally)
                took = time.monotonic() - began
                line = f"{n + 1}/{faults} at {wall:.2f} {fault.value} {step.value}: {took:.1f} s"
                print(line, file=sys.stderr)
            rig.sandbox.set_answer_delay(0.0)
            time.sleep(FLEET_TIMINGS["resolve_wait_seconds"])  # a last fault-free while
            recover(rig, tally)
        for host in rig.hosts:
            if host.daemon is not None:
                Rig.stop(host.daemon)
        tally.verdict = judge_run(
            rig.sandbox.log(), rig.imported, reads, tally.reported, tally.residual, tally.replacing
        )
    finally:
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            for host in rig.hosts:
                (logs / f"{host.name}.log").write_text(host.rig.daemon_log())
            (logs / "sandbox.json").write_text(json.dumps(rig.sandbox.log(), indent=1))
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
    parser.add_argument("--logs", type=Path, help="keep the daemons' and sandbox's logs here")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    tally = run_campaign(args.faults, seed, args.profiles, args.logs)
    print("\n".join(tally.lines()), flush=True)
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())

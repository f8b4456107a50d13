"""The crash campaign (``make crash``): SIGKILL aac-tokend at random moments, count lost chains.

    python -m tests.crash_campaign --kills 300 [--courier-kills N] [--seed S]

1. Daemon kills. Real ``aac-tokend run`` processes with three profiles against the sandbox
   (2 s access tokens, so every profile rotates every ~1.5 s), each SIGKILLed at a random
   moment: during start-up, anywhere, or just after the sandbox logged a rotation whose
   answer is still on its way (answer delays up to 400 ms). Restarted at once every time.
   The courier carries each refresh to disk on its own, so daemon kills must lose nothing.
2. Courier kills. The one place a SIGKILL can still lose a chain is the courier itself,
   between the request leaving and the outcome being durable. Couriers are killed before
   their request, inside that window, or anywhere; a chain must be lost exactly when the
   kill was inside the window, and the loss must be reported ``after_lost_response``.
3. Disk faults, in process (tests/crash_storage.py): ENOSPC, EIO on fsync or rename,
   EROFS, under the journal and under the outcome, and the daemon dying while it holds a
   pair the disk refused: its pending copy (pending.py) must keep the chain, so 0 chains
   are lost to daemon kills; only where the pending directory fails too is one lost.
4. The window's width, timed inside the courier transaction over real refreshes.

The referee is the sandbox's request log: a chain is lost when its family is revoked, which
happens only when a refresh token is presented twice. Exit status 1 on any finding.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from aac_tokend.core.state import RejectionReason
from aac_tokend.core.tokens import token_hash
from aac_tokend.host.logs import configure_logging
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import hold_lock

from .crash_rig import TIMEOUT, Chain, Rig, chains, proc_info, rotations, wait_for
from .crash_storage import FaultResult, Window, measure_window, run_faults

__all__ = ["Tally", "main", "run_campaign"]

PROFILES = ("alpha", "beta", "gamma")
#: Whole seconds on the wire; 2 s is the shortest the daemon can serve (1 s serve margin),
#: and makes each profile refresh every ~1.5 s, so most kills meet a refresh in progress.
DAEMON_ACCESS_TTL = 2.0
#: Answer delays drawn per daemon life: the wider, the more kills land inside a rotation.
ANSWER_DELAYS = (0.0, 0.05, 0.2, 0.4)
#: Long tokens in the courier phase: only the campaign's own requests refresh.
COURIER_ACCESS_TTL = 600.0
#: Courier-phase answer delay: room to land a kill between the rotation and the answer.
COURIER_ANSWER_DELAY = 0.3
#: The daemon's retry of a lost refresh comes at least backoff_first_seconds / 2 = 1 s after
#: the loss; a request already on the wire when its courier died is decided within ms.
RETRY_FLOOR_SECONDS = 0.5
WAYS_TO_KILL_A_COURIER = ("in the window", "before the request", "anywhere")


@dataclass
class Tally:
    """Everything counted, and every finding."""

    seed: int = 0
    daemon_kills: int = 0
    starts: int = 0
    rotations: int = 0
    kills_with_pair_in_flight: int = 0
    daemon_losses: Counter[str] = field(default_factory=Counter)
    courier_attempts: int = 0
    courier_kills: int = 0
    courier_kills_in_window: int = 0
    courier_losses: Counter[str] = field(default_factory=Counter)
    faults: list[FaultResult] = field(default_factory=list)
    window: Window | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        fault_losses = Counter(f.reason or "unreported" for f in self.faults if f.lost)
        out = [
            f"aac-tokend crash campaign (seed {self.seed})",
            f"daemon kills:  {self.daemon_kills} SIGKILLs, {self.starts} daemon starts, "
            f"{self.rotations} rotations, {self.kills_with_pair_in_flight} kills while a "
            f"rotated pair was not yet on disk; chains lost: {_losses(self.daemon_losses)}",
            f"courier kills: {self.courier_attempts} refreshes, {self.courier_kills} couriers "
            f"SIGKILLed (the rest had finished), {self.courier_kills_in_window} "
            f"inside the window, {self.courier_kills - self.courier_kills_in_window} outside; "
            f"chains lost: {_losses(self.courier_losses)}",
            f"disk faults:   {len(self.faults)} faults, "
            f"{sum(not f.lost for f in self.faults)} chains kept; chains lost: "
            f"{_losses(fault_losses)} (only where the pending copy failed too)",
        ]
        out += self.window.lines() if self.window else []
        out.append(f"duration: {self.seconds:.0f} s")
        out += [f"FINDING: {p}" for p in self.problems]
        out.append("PASS" if self.ok else f"FAIL ({len(self.problems)} findings)")
        return out


def _losses(counts: Counter[str]) -> str:
    total = sum(counts.values())
    return f"{total}" + (f" ({', '.join(f'{k}: {v}' for k, v in counts.items())})" if total else "")


def judge(chain: Chain) -> list[str]:
    """A kept chain must be clean; a lost one clean up to the one resend that revealed it."""
    if not chain.lost:
        return chain.problems()
    head, last = Chain(chain.first_rt_hash, chain.entries[:-1]), chain.entries[-1]
    found = head.problems()
    spent = [e["rt_hash"] for e in head.entries if e["outcome"] == "rotated"][-1:]
    if last["outcome"] != "reuse_revoked" or [last["rt_hash"]] != spent:
        found.append(f"seq {last['seq']}: the chain ended {last['outcome']}, not by a retry")
    return found


# -- 1. daemon kills ---------------------------------------------------------------------------
def _wait_quietly(check: Callable[[], bool], timeout: float) -> None:
    """Like wait_for, but running out of time is not a finding."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not check():
        time.sleep(0.003)


def _kill_moment(rng: random.Random, sandbox: SandboxServer, delay: float) -> None:
    """Sleep until a random moment worth a SIGKILL."""
    draw = rng.random()
    if draw < 0.4:  # just after a rotation: the new pair is on its way to the courier
        seen = len(rotations(sandbox.log()))
        _wait_quietly(lambda: len(rotations(sandbox.log())) > seen, 4.0)
        time.sleep(rng.uniform(0.0, delay + 0.01))
    elif draw < 0.6:  # during start-up: owner lock, key, adopting and recovering profiles
        time.sleep(rng.uniform(0.0, 0.4))
    else:
        time.sleep(rng.uniform(0.0, 2.0))


def _current(rig: Rig, sandbox: SandboxServer) -> dict[str, Chain]:
    firsts = [rig.first_rt_hashes[p][-1] for p in PROFILES]
    return dict(zip(PROFILES, chains(sandbox.log(), firsts), strict=True))


def _replace_lost(rig: Rig, sandbox: SandboxServer, tally: Tally) -> None:
    """Count each newly lost chain (with the reason the state gives) and import a new one."""
    for profile, chain in _current(rig, sandbox).items():
        rejection = rig.state(profile).rejection
        if chain.lost or rejection is not None:
            reason = rejection.reason.value if rejection else "not_reported_yet"
            tally.daemon_losses[reason] += 1
            tally.problems.append(f"a daemon kill lost the chain of {profile} ({reason})")
            rig.import_profile(profile)


def daemon_phase(kills: int, rng: random.Random, tally: Tally) -> None:
    """Kill the daemon ``kills`` times; then one daemon lives and every chain must work."""
    with SandboxServer(access_ttl=DAEMON_ACCESS_TTL) as sandbox:
        rig = Rig(sandbox)
        try:
            for profile in PROFILES:
                rig.import_profile(profile)
            for _ in range(kills):
                delay = rng.choice(ANSWER_DELAYS)
                sandbox.set_answer_delay(delay)
                proc = rig.start()
                tally.starts += 1
                _kill_moment(rng, sandbox, delay)
                if proc.poll() is not None:
                    tally.problems.append(f"a daemon ended by itself (status {proc.returncode})")
                Rig.kill(proc)
                tally.daemon_kills += 1
                tally.kills_with_pair_in_flight += any(
                    chain.current_rt_hash != rig.durable_rt_hash(profile)
                    for profile, chain in _current(rig, sandbox).items()
                )
                rig.reap()
                _replace_lost(rig, sandbox, tally)
            sandbox.set_answer_delay(0.0)
            proc = rig.start()
            tally.starts += 1
            rig.wait_ready(proc)
            before = {p: c.rotated for p, c in _current(rig, sandbox).items()}
            wait_for(
                "every chain to rotate under a living daemon",
                lambda: all(c.rotated > before[p] for p, c in _current(rig, sandbox).items()),
            )
            for profile in PROFILES:
                if not rig.api_accepts(rig.wait_token(profile)):
                    tally.problems.append(f"the API refused the token served for {profile}")
            Rig.stop(proc)
            rig.wait_couriers_gone()
            _replace_lost(rig, sandbox, tally)
            _judge_all(rig, sandbox, tally)
        finally:
            rig.close()


def _judge_all(rig: Rig, sandbox: SandboxServer, tally: Tally) -> None:
    firsts = [h for hashes in rig.first_rt_hashes.values() for h in hashes]
    for chain in chains(sandbox.log(), firsts):
        tally.rotations += chain.rotated
        tally.problems.extend(judge(chain))


# -- 2. courier kills --------------------------------------------------------------------------
def _dead(pid: int) -> bool:
    info = proc_info(pid)
    return info is None or info.state in ("Z", "X")


def _settled(rig: Rig, count: int) -> bool:
    rows = rig.control("status")["profiles"]
    assert isinstance(rows, list)
    row = rows[0]
    return row["rejection"] is not None or (
        row["refresh_count"] > count and row["consecutive_failures"] == 0
    )


def _kill_courier(rig: Rig, daemon_pid: int, how: str, rng: random.Random, tally: Tally) -> None:
    """One refresh whose courier is SIGKILLed ``how``; the chain's fate, judged."""
    sandbox = rig.sandbox
    state = rig.state()
    old = token_hash(state.refresh_token or "")
    tally.courier_attempts += 1
    with contextlib.ExitStack() as held:
        if how == "before the request":  # the courier waits for this lock, then we kill it
            held.enter_context(hold_lock(rig.paths.state_dir / "default.lock", TIMEOUT))
        rig.refresh_in_background()
        courier = wait_for("a courier", lambda: rig.couriers(daemon_pid))[0]
        if how == "in the window":
            _wait_quietly(lambda: any(e["rt_hash"] == old for e in sandbox.log()), 5.0)
            time.sleep(rng.uniform(0.0, COURIER_ANSWER_DELAY * 0.8))
        elif how == "anywhere":
            time.sleep(rng.uniform(0.0, COURIER_ANSWER_DELAY + 0.05))
        killed_at = time.time()
        try:
            os.kill(courier, signal.SIGKILL)
            tally.courier_kills += 1
        except ProcessLookupError:
            pass  # it finished first: a kill after the window, the outcome must be on disk
        wait_for("the courier's death", lambda: _dead(courier))
    durable_at_death = rig.durable_rt_hash()
    wait_for("the daemon to settle", lambda: _settled(rig, state.refresh_count))
    own = [e for e in sandbox.log() if e["rt_hash"] == old]
    own = [e for e in own if cast(float, e["at"]) < killed_at + RETRY_FLOOR_SECONDS]
    in_window = bool(own) and own[0]["outcome"] == "rotated" and durable_at_death == old
    tally.courier_kills_in_window += in_window
    rejection = rig.state().rejection
    if rejection is not None:
        tally.courier_losses[rejection.reason.value] += 1
        if not in_window:
            tally.problems.append(f"a courier killed {how}, outside the window, lost the chain")
        if rejection.reason is not RejectionReason.AFTER_LOST_RESPONSE:
            tally.problems.append(f"a lost answer was reported as {rejection.reason.value}")
        rig.import_profile()
    elif in_window:
        tally.problems.append("a courier killed inside the window did not lose the chain?")


def courier_phase(kills: int, rng: random.Random, tally: Tally) -> None:
    """Kill ``kills`` couriers of one living daemon, in turn in each way."""
    with SandboxServer(access_ttl=COURIER_ACCESS_TTL, answer_delay=COURIER_ANSWER_DELAY) as sandbox:
        rig = Rig(sandbox)
        try:
            rig.import_profile()
            daemon = rig.start()
            tally.starts += 1
            rig.wait_ready(daemon)
            for i in range(kills):
                how = WAYS_TO_KILL_A_COURIER[i % len(WAYS_TO_KILL_A_COURIER)]
                _kill_courier(rig, daemon.pid, how, rng, tally)
            Rig.stop(daemon)
            rig.wait_couriers_gone()
            for chain in chains(sandbox.log(), rig.first_rt_hashes["default"]):
                tally.rotations += chain.rotated
                tally.problems.extend(judge(chain))
        finally:
            rig.close()


# -- 3 and 4, and the whole --------------------------------------------------------------------
def run_campaign(
    kills: int, courier_kills: int, seed: int, window_samples: int = 50, faults: bool = True
) -> Tally:
    """Run every phase; the tally says what happened and what is wrong."""
    started = time.monotonic()
    rng = random.Random(seed)
    tally = Tally(seed=seed)
    daemon_phase(kills, rng, tally)
    courier_phase(courier_kills, rng, tally)
    with SandboxServer(access_ttl=COURIER_ACCESS_TTL) as sandbox:
        if faults:
            tally.faults = run_faults(sandbox)
            for result in tally.faults:
                tally.problems.extend(f"{result.fault.name}: {p}" for p in result.problems)
        tally.window = measure_window(sandbox, window_samples)
    tally.seconds = time.monotonic() - started
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.crash_campaign",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kills", type=int, default=300, help="daemon SIGKILLs (default 300)")
    parser.add_argument("--courier-kills", type=int, help="courier SIGKILLs (default kills/20)")
    parser.add_argument("--seed", type=int, help="random seed (default: from the clock)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    courier_kills = (
        args.courier_kills if args.courier_kills is not None else max(3, args.kills // 20)
    )
    # The in-process phases run the engine, whose log lines would bury the report.
    configure_logging("json", "critical", stream=open(os.devnull, "w"))  # noqa: SIM115
    tally = run_campaign(args.kills, courier_kills, seed)
    print("\n".join(tally.lines()), flush=True)
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())

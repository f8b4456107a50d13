"""The fleet campaign's faults: each aimed at a profile's owner, at a step of its courier's
transaction, which the rig sees from outside (tests/fleet_rig.py).

REQUESTED: a refresh was asked for (before the journal commit); JOURNALED: the chain record
holds an unresolved entry (between commit and send); ANSWERED: the sandbox logged the request
and holds its answer (between answer and outcome commit); ANY moment. ``PLAN`` takes every
fault in turn: SIGKILL of the owner's daemon and of its courier; SIGSTOP of either for
longer than the lease; the owner cut off from etcd for longer than the lease (some cuts
outlast W after an answer: issue #13's first residual case); etcd's reply to the owner's next
write dropped after etcd applied it; the etcd leader killed mid-refresh; one member, then two.
A fault that destroys an answer by design is noted as a window for the referee.
"""

from __future__ import annotations

import contextlib
import enum
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aac_tokend.core.tokens import token_hash

from .fleet_referee import Window
from .fleet_rig import FLEET_TIMINGS, FleetRig, Host

__all__ = ["PLAN", "Fault", "Landed", "Step", "apply_fault", "poll"]

LEASE = float(FLEET_TIMINGS["lease_ttl_seconds"])
W = float(FLEET_TIMINGS["resolve_wait_seconds"])
LIFE = float(FLEET_TIMINGS["courier_life_seconds"])
#: Pauses and cuts last past the lease, so that another host takes over meanwhile.
HOLD_SECONDS = (LEASE + 0.5, LEASE + 2.0, W - 1.0)
#: A cut this long after an answer is the first residual case (W, with a second to spare).
RESIDUAL_HOLD = W + 1.5
#: Share of answer-step cuts made residual: enough to see them explained, rare as in life.
RESIDUAL_SHARE = 0.25
#: Answer delays drawn per fault: the wider, the more faults land inside the answer window.
ANSWER_DELAYS = (0.0, 0.1, 0.4)
#: An heir resolves an inherited entry W after it first saw it, once it owns the chain (a
#: lease TTL after the owner died), and retries within the request deadline: with room to spare.
RESOLVE_TIMEOUT = LEASE + W + float(FLEET_TIMINGS["request_deadline_seconds"]) + 10.0
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


def poll(check: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(POLL)
    return False


@dataclass
class Refresh:
    """A refresh the owner was asked for: when, and whether its request has left."""

    rig: FleetRig
    old: str = ""  # the rt hash it spends
    seen: int = 0  # sandbox log entries before it
    asked_at: float = 0.0
    asking: threading.Thread | None = None  # the control call, which ends with the refresh

    def sent(self) -> bool:
        return any(e["rt_hash"] == self.old for e in self.rig.sandbox.log()[self.seen :])


def _ask(rig: FleetRig, owner: Host, profile: str, refresh: Refresh) -> None:
    """Ask the owner for a refresh (not waiting for it); ``refresh`` follows it."""
    record = rig.record(profile)
    token = record.state.refresh_token if record else None
    refresh.old = token_hash(token) if token else ""
    refresh.seen = len(rig.sandbox.log())
    refresh.asked_at = time.time()
    refresh.asking = owner.rig.refresh_in_background(profile)


def _reach(rig: FleetRig, profile: str, step: Step, refresh: Refresh, rng: random.Random) -> bool:
    """Wait until the refresh's courier is at ``step``; False: the step was missed."""
    if step is Step.ANY:
        time.sleep(rng.uniform(0.0, 1.0))
    if step in (Step.ANY, Step.REQUESTED):
        return True
    if step is Step.JOURNALED:
        # Between the commit and the send lies one etcd round trip: seen from outside, the
        # request has often left already, and then the fault missed its step.
        journaled = poll(lambda: (r := rig.record(profile)) and r.unresolved, STEP_TIMEOUT)
        return journaled and not refresh.sent()
    return poll(refresh.sent, STEP_TIMEOUT)


@dataclass(frozen=True)
class Landed:
    """How a fault landed: at its step or not, and the window of an answer it destroyed."""

    reached: bool
    lost_answer: Window | None = None


def apply_fault(rig: FleetRig, fault: Fault, step: Step, rng: random.Random) -> Landed:
    """One fault aimed at a random profile's owner, at ``step``; it returns once the refresh
    it was aimed at has ended (so that the next fault meets a refresh of its own)."""
    refresh = Refresh(rig)
    try:
        return _apply(rig, fault, step, rng, refresh)
    finally:
        if refresh.asking is not None:
            refresh.asking.join(LIFE + 10.0)


def _apply(rig: FleetRig, fault: Fault, step: Step, rng: random.Random, refresh: Refresh) -> Landed:
    profile = rng.choice(sorted(rig.imported))
    owner = rig.wait_owner(profile)
    rig.sandbox.set_answer_delay(rng.choice(ANSWER_DELAYS) if step is not Step.ANSWERED else 0.4)
    if fault is Fault.DROP_REPLY:
        owner.link.drop_writes(1)
    if fault is Fault.KILL_MEMBERS:
        rig.kill_members(1)
        time.sleep(rng.uniform(0.5, LEASE))
        rig.kill_members(1)
        time.sleep(rng.uniform(LEASE, W))
        rig.restore_members()
        return Landed(True)
    _ask(rig, owner, profile, refresh)
    reached = _reach(rig, profile, step, refresh, rng)
    hold = rng.choice(HOLD_SECONDS)
    if fault is Fault.KILL_DAEMON:
        rig.kill_daemon(owner)
    elif fault in (Fault.KILL_COURIER, Fault.STOP_COURIER):
        couriers = rig.couriers(owner)
        if not couriers:
            return Landed(False)
        if fault is Fault.KILL_COURIER:
            with contextlib.suppress(ProcessLookupError):  # it may have finished meanwhile
                os.kill(couriers[0], signal.SIGKILL)
            if refresh.sent():  # its answer may have died with the one process holding it
                return Landed(reached, Window(refresh.asked_at, time.time()))
        else:
            # Longer than the lease. After the answer, well inside the courier's life (a pause
            # past it would be a kill); before, also most of its life, which must then not
            # be spent on a request its life limit would cut before the outcome is committed.
            late = step is not Step.ANSWERED and rng.random() < 0.5
            with rig.paused(owner, couriers[0]):
                time.sleep(LIFE - 1.5 if late else LEASE + 0.5)
    elif fault is Fault.STOP_DAEMON:
        assert owner.daemon is not None
        with rig.paused(owner, owner.daemon.pid):
            time.sleep(hold)
    elif fault is Fault.CUT:
        residual = reached and step is Step.ANSWERED and rng.random() < RESIDUAL_SHARE
        with rig.cut_off(owner):
            time.sleep(RESIDUAL_HOLD if residual else hold)
        if residual:
            return Landed(True, Window(refresh.asked_at, time.time()))
    elif fault is Fault.KILL_LEADER:
        rig.kill_members(1)
        time.sleep(rng.uniform(0.5, LEASE))
        rig.restore_members()
    return Landed(reached)

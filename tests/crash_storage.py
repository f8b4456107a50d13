"""The crash campaign's in-process part: disk faults under a refresh, and the window's width.

Each fault runs the real engine and the real courier transaction (``carry``) in this
process, with a ``FileStore`` over a ``FailingFileLayer`` and the loopback sandbox as the
token endpoint. Every fault leaves the chain alive: nothing is sent while the journal cannot
be written, and a new state the disk refuses is held by the engine until the disk takes it,
and kept encrypted in the pending directory (another file system), so a daemon that dies
holding it loses nothing: the next one adopts it.

``python -m tests.crash_storage hold CONFIG_DIR STATE_DIR PENDING_DIR PROFILE`` is that
dying daemon as a real process: it refreshes PROFILE while the state disk fails after the
journal, prints "held" once it holds the unsaved pair, and waits to be killed.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aac_tokend.core.config import Config
from aac_tokend.core.importer import build_state, parse_import_text
from aac_tokend.core.state import RejectionReason
from aac_tokend.core.tokens import token_hash
from aac_tokend.daemon.alerts import Alerter
from aac_tokend.daemon.engine import Engine
from aac_tokend.daemon.scheduling import SystemClock
from aac_tokend.host.logs import configure_logging
from aac_tokend.refresh.endpoint import TokenEndpoint
from aac_tokend.refresh.result import CourierKind, CourierResult
from aac_tokend.refresh.transaction import CourierJob, carry
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import FileStore, load_or_create_key
from aac_tokend.store.pending import PendingStore
from aac_tokend.testing import FailingFileLayer, FakeScheduler

from .crash_rig import chains

__all__ = ["FAULTS", "Fault", "FaultResult", "Window", "measure_window", "run_faults"]


@dataclass(frozen=True)
class Fault:
    """A disk fault: which operations fail, from which step, for how long."""

    name: str
    failures: dict[str, int]
    after_journal: bool  # False: the journal itself fails (nothing may be sent)
    remaining: int | None = None  # None: until the disk is healed
    daemon_dies: bool = False  # the daemon dies holding the unsaved state, before the heal
    pending_fails: bool = False  # the pending directory fails too: the loss is then reported


FAULTS = (
    Fault("journal-enospc", {"write": errno.ENOSPC}, after_journal=False),
    Fault("journal-eio-fsync", {"fsync": errno.EIO}, after_journal=False),
    Fault("journal-eio-rename", {"rename": errno.EIO}, after_journal=False),
    Fault("journal-erofs", {"write": errno.EROFS}, after_journal=False),
    Fault("journal-eio-read", {"read": errno.EIO}, after_journal=False, remaining=1),
    Fault("outcome-enospc-brief", {"write": errno.ENOSPC}, after_journal=True, remaining=2),
    Fault("outcome-eio-fsync", {"fsync": errno.EIO}, after_journal=True),
    Fault("outcome-eio-rename", {"rename": errno.EIO}, after_journal=True),
    Fault("outcome-eio-fsyncdir", {"fsync_dir": errno.EIO}, after_journal=True),
    Fault("outcome-erofs-then-crash", {"write": errno.EROFS}, after_journal=True, daemon_dies=True),
    Fault("outcome-eio-then-crash", {"fsync": errno.EIO}, after_journal=True, daemon_dies=True),
    Fault(
        "outcome-and-pending-enospc-then-crash",
        {"write": errno.ENOSPC},
        after_journal=True,
        daemon_dies=True,
        pending_fails=True,
    ),
)


@dataclass
class FaultResult:
    """How a fault ended: chain alive or lost (with the reason the daemon gave)."""

    fault: Fault
    lost: bool = False
    reason: str | None = None
    problems: list[str] = field(default_factory=list)


class _FaultyRefresher:
    """Carries each refresh in this thread through the faulty store, arming the fault."""

    def __init__(self, store: FileStore, arm: Callable[[], None]) -> None:
        self._store, self._arm = store, arm

    def refresh(self, job: CourierJob) -> CourierResult:
        def step(name: str) -> None:
            if name == "journaled":
                self._arm()

        return carry(job, self._store, TokenEndpoint(), time.time, trace=step)


def _no_fault() -> None:
    """Arms nothing: the fault, if any, is already in place."""


def _engine(store: FileStore, refresher: object, home: Path) -> Engine:
    engine = Engine(
        store=store,
        refresher=refresher,  # type: ignore[arg-type]
        scheduler=FakeScheduler(),
        clock=SystemClock(),
        config=Config(),
        alerter=Alerter([]),
        socket_path=lambda name: home / name,
    )
    engine.start()
    return engine


def _import(sandbox: SandboxServer, store: FileStore, profile: str) -> str:
    pair = sandbox.generate()
    request = parse_import_text(json.dumps(pair), profile=profile)
    request = dataclasses.replace(request, token_endpoint=sandbox.token_endpoint)
    store.save(build_state(request, time.time()))
    return token_hash(str(pair["refresh_token"]))


def run_fault(sandbox: SandboxServer, fault: Fault) -> FaultResult:
    """One fault under one refresh of a fresh chain; the chain's fate, judged."""
    home = Path(tempfile.mkdtemp(prefix="atk", dir="/tmp"))
    out = FaultResult(fault)
    try:
        key = secrets.token_bytes(32)
        fs = FailingFileLayer()
        # The pending directory is another file system: it fails only where the fault says.
        pending_fs = fs if fault.pending_fails else None
        pending = PendingStore(home / "run" / "pending", pending_fs)
        store = FileStore(home / "state", key, fs=fs, pending=pending)
        first = _import(sandbox, store, fault.name)

        def arm() -> None:
            fs.failures, fs.remaining = dict(fault.failures), fault.remaining

        refresher = _FaultyRefresher(store, arm if fault.after_journal else _no_fault)
        engine = _engine(store, refresher, home)
        if not fault.after_journal:
            arm()
        state = engine.refresh(fault.name)
        (chain,) = chains(sandbox.log(), [first])
        if not fault.after_journal:
            if chain.entries:
                out.problems.append("a request left although the journal was not written")
            if state.consecutive_failures < 1:
                out.problems.append("the failed attempt was not counted (the retry would spin)")
        elif fault.remaining is None:
            served = engine.current_token(fault.name)
            if (
                state.refresh_token is None
                or token_hash(state.refresh_token) != chain.current_rt_hash
            ):
                out.problems.append("the engine does not hold the pair the server issued")
            if served is None or served.decode() != state.access_token:
                out.problems.append("the engine does not serve the unsaved new token")
            if not engine.status()[0].alert:
                out.problems.append("status does not report the unsaved state")
            if engine.refresh(fault.name) is not state or len(chain.entries) != 1:
                out.problems.append("a refresh was sent while the newest pair was unsaved")
        if fault.daemon_dies:  # the daemon dies holding the unsaved pair; restart on a good disk
            if not fault.pending_fails and not any(pending.directory.glob("*.pending")):
                out.problems.append("the refused pair was not kept in the pending directory")
            del engine
            fs.failures, fs.remaining = {}, None
            pending = PendingStore(home / "run" / "pending")
            healed = FileStore(home / "state", key, pending=pending)
            refresher = _FaultyRefresher(healed, _no_fault)
            engine = _engine(healed, refresher, home)
        fs.failures, fs.remaining = {}, None
        engine.tick()  # retries an unsaved state
        if any(pending.directory.glob("*.pending")):
            out.problems.append("the pending record outlived the save of its state")
        state = engine.refresh(fault.name)
        (chain,) = chains(sandbox.log(), [first])
        out.lost = chain.lost or state.rejection is not None
        if not out.lost:  # a lost chain's last request is, by definition, a resend
            out.problems.extend(chain.problems())
        if state.rejection is not None:
            out.reason = state.rejection.reason.value
        if out.lost and not fault.pending_fails:
            out.problems.append(f"chain lost ({out.reason}); the pending copy should have kept it")
        if fault.pending_fails and out.reason != RejectionReason.AFTER_LOST_RESPONSE.value:
            out.problems.append(f"loss reported as {out.reason}, not after_lost_response")
        if not out.lost and token_hash(state.refresh_token or "") != chain.current_rt_hash:
            out.problems.append("after the heal the state is not the chain's newest pair")
    except Exception as exc:  # a crash of the scenario itself is a finding, not a stop
        out.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return out


def run_faults(sandbox: SandboxServer, faults: tuple[Fault, ...] = FAULTS) -> list[FaultResult]:
    """Every fault, concurrently: each waits out the courier's own save retries (~4 s)."""
    with ThreadPoolExecutor(len(faults)) as pool:
        return list(pool.map(lambda f: run_fault(sandbox, f), faults))


@dataclass
class Window:
    """Widths in milliseconds, one sample per refresh."""

    answer_to_durable: list[float]  # the answer exists only in the courier's memory
    decision_to_durable: list[float]  # the server has rotated; the new pair is not on disk

    @staticmethod
    def _summary(values: list[float]) -> str:
        if not values:
            return "no samples"
        ordered = sorted(values)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return (
            f"median {statistics.median(ordered):.2f} ms, p99 {p99:.2f} ms, "
            f"max {ordered[-1]:.2f} ms (n={len(ordered)})"
        )

    def lines(self) -> list[str]:
        return [
            f"window, answer received -> durable: {self._summary(self.answer_to_durable)}",
            f"window, server rotation -> durable: {self._summary(self.decision_to_durable)}",
        ]


def measure_window(sandbox: SandboxServer, samples: int) -> Window:
    """Time the courier's window over ``samples`` real refreshes on the real file layer."""
    home = Path(tempfile.mkdtemp(prefix="atk", dir="/tmp"))
    window = Window([], [])
    try:
        key = secrets.token_bytes(32)
        store = FileStore(home, key)
        _import(sandbox, store, "window")
        for _ in range(samples):
            marks: dict[str, float] = {}
            state = store.load("window")
            assert state is not None and state.refresh_token is not None
            job = CourierJob("window", state.refresh_token)
            result = carry(
                job, store, TokenEndpoint(), time.time,
                trace=lambda step, marks=marks: marks.setdefault(step, time.time()),  # type: ignore[misc]
            )  # fmt: skip
            if result.kind is not CourierKind.REFRESHED:
                raise RuntimeError(f"window measurement: refresh ended {result.kind}")
            decided = sandbox.log()[-1]["at"]
            assert isinstance(decided, float)
            window.answer_to_durable.append((marks["persisted"] - marks["answered"]) * 1000)
            window.decision_to_durable.append((marks["persisted"] - decided) * 1000)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return window


def hold(config_dir: Path, state_dir: Path, pending_dir: Path, profile: str) -> None:
    """The dying daemon: refresh ``profile`` while the state disk fails after the journal."""
    configure_logging("json", "critical", stream=sys.stderr)  # stdout says "held", only
    key = load_or_create_key(config_dir)
    fs = FailingFileLayer()
    store = FileStore(state_dir, key, fs=fs, pending=PendingStore(pending_dir))

    def arm() -> None:
        fs.failures = {"write": errno.EROFS}

    engine = _engine(store, _FaultyRefresher(store, arm), state_dir)
    state = engine.refresh(profile)
    print("held" if engine.status(only=profile)[0].alert else "not held", flush=True)
    del state
    while True:  # the test SIGKILLs us: the daemon dies holding the unsaved pair
        time.sleep(60)


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "hold":
        sys.exit(
            f"usage: python -m tests.crash_storage hold CONFIG STATE PENDING PROFILE; {__doc__}"
        )
    hold(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])

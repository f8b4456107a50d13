"""The spawned courier: a fresh interpreter carries each refresh, and one waits ready.

Where fork is unsafe (macOS, see courier.py) a courier is ``python -P -m
aac_tokend.refresh.spawned`` (a tiny entry that turns deaf to signals, then runs ``main``
here), started in ``/``, reading its store's spec (with the state key) and its job (with
the refresh token) from a pipe on stdin, never from argv or the environment, and writing its
result to stdout. ``-P`` and ``/``: the daemon's working directory is nobody's code, and a
module planted there would otherwise shadow the stdlib in a process that holds the key.

A fresh interpreter pays for its imports: measured on the 2-core CI machine, a cold spawn
costs ~150-450 ms over an in-process refresh (requests and urllib3 ~100-250 ms,
cryptography ~25-80 ms, site and this package ~50 ms; the range is the load), against a
budget of +100 ms. A refresh needs requests and cryptography, so no trimming gets there.
So one courier is started in advance, a *spare*: it does its imports, leaves the daemon's
session, turns deaf to SIGTERM/SIGINT/SIGHUP, tells the daemon it is ready and blocks on
stdin. A refresh hands its job to the spare (no interpreter start on the refresh path) and
a replacement is started after the answer, off the refresh's clock. The courier's life
bound (``MAX_LIFE_SECONDS``) counts from when the daemon hands the job over, as a forked
courier's counts from the fork: the message carries a deadline on ``time.monotonic()``,
which on Linux (CLOCK_MONOTONIC) and macOS (mach_absolute_time) is one clock for every
process of the host, since boot. The courier sends nothing past it, and its SIGALRM is
armed for what is left. So a spare stopped (SIGSTOP) with its job unread, which the daemon
gave up on, cannot wake later and send a token that was retried meanwhile. If the daemon
dies, the spare reads EOF and exits at once: it has touched no state.

A fleet courier (fleet/courier.py's FleetCourier, argv flag ``--fleet``) first reads a
greeting on stdin (the fleet to open, length-prefixed, written by the daemon right after the
spawn) and opens it before it says it is ready; the message with the job follows as here.

One spare only: a second refresh running at the same time spawns a cold courier. A spare
runs the code that was on disk when it started, so the keeper thread replaces any spare
older than ``SPARE_MAX_AGE_SECONDS`` (an upgrade in place reaches the couriers within
minutes, even before the daemon restarts), replaces one that died, and reaps the couriers
let go.

Over 300 lines for one concern: both ends of the pipe (the daemon's ``SpawnCourier`` and the
courier's ``main``) and the message between them, which change together.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..store.files import FileStoreSpec
from .courier import MAX_LIFE_SECONDS, WAIT_SECONDS, become_courier, disarm
from .endpoint import MAX_BODY_BYTES, TokenEndpoint
from .result import CourierKind, CourierResult
from .transaction import CourierJob, carry

if TYPE_CHECKING:
    import subprocess

__all__ = [
    "COURIER_MODULE",
    "READY",
    "SpawnCourier",
    "courier_command",
    "main",
    "read_spawn_message",
    "spawn_message",
]

#: The module a spawned courier runs; its name in ``ps`` (and what the tests look for).
COURIER_MODULE = "aac_tokend.refresh.spawned"
#: In a courier's argv: a fleet spare, which imports fleet mode ahead (no secret in it).
FLEET_FLAG = "--fleet"
#: The byte a courier writes once its imports are done. Not JSON, so never a result.
READY = b"\x06"
#: A spawn message is a few hundred bytes, but its refresh token is whatever the server
#: gave: up to a whole answer (the endpoint reads at most MAX_BODY_BYTES), and JSON-escaped
#: again here each character of it takes at most 6 bytes (a \uXXXX escape) for at least one
#: in the answer. Plus the store's spec and the other fields, well under 64 KiB.
MAX_MESSAGE_BYTES = 6 * MAX_BODY_BYTES + 65536
#: The daemon waits this much longer than a courier's bound (the courier's own SIGALRM ends
#: it first, so a LOST courier has ended or is past its deadline and sends nothing).
WAIT_MARGIN_SECONDS = WAIT_SECONDS - MAX_LIFE_SECONDS
#: A spare runs the code on disk when it started: replaced after this long, so an upgrade
#: in place reaches the couriers within minutes. Each replacement costs one interpreter
#: start (~0.3 s of CPU) per 10 minutes, under 0.1 % of one core.
SPARE_MAX_AGE_SECONDS = 600.0
#: How often the keeper looks at the spare's age. Wall-clock age (a suspended laptop's spare
#: is as old as the calendar says), checked often enough to see a clock step soon.
KEEPER_TICK_SECONDS = 30.0
#: How often the keeper looks while a courier let go has not yet ended (a spare let go ends
#: within milliseconds): it is reaped at once, not left a zombie for a whole tick.
REAP_TICK_SECONDS = 1.0
#: Blocked in the daemon's thread while it starts a courier, so the child starts with them
#: blocked: spawned.py ignores them before its imports; one sent meanwhile is discarded.
_DEAF_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def courier_command(interpreter: str = sys.executable) -> list[str]:
    """The argv of a spawned courier: nothing secret, and the same interpreter as ours."""
    # Not -S or -I: skipping site saved ~10 ms of a cold start here (the spare hides start-up
    # anyway), and would skip what site does for the user: .pth hooks (pip-system-certs and
    # the like, which make requests trust a corporate CA), sitecustomize, the user site-packages
    # of a `pip install --user`. -X frozen_modules is already on in release builds.
    # -P (3.11+): not the working directory first on sys.path (see the module docstring).
    return [interpreter, "-P", "-m", COURIER_MODULE]


def _lost(detail: str) -> CourierResult:
    return CourierResult(CourierKind.LOST, detail)


def spawn_message(spec: FileStoreSpec, job: CourierJob, deadline: float | None = None) -> bytes:
    """What a spawned courier reads on stdin: where its store is, its job, and the
    ``time.monotonic()`` past which it sends nothing (by default ``MAX_LIFE_SECONDS`` on)."""
    if deadline is None:
        deadline = time.monotonic() + MAX_LIFE_SECONDS
    data: dict[str, Any] = {
        "store": spec.to_dict(),
        "job": {
            "profile": job.profile,
            "refresh_token": job.refresh_token,
            "lifetime_days": job.lifetime_days,
            "generation": job.generation,
        },
        "deadline": deadline,
    }
    return json.dumps(data).encode()


def read_spawn_message(raw: bytes) -> tuple[FileStoreSpec, CourierJob, float]:
    """The store's spec, the job and its deadline in a spawned courier's stdin
    (``spawn_message``)."""
    data = json.loads(raw)
    job = data["job"]
    days, generation = job.get("lifetime_days"), job.get("generation")
    courier_job = CourierJob(
        str(job["profile"]),
        str(job["refresh_token"]),
        lifetime_days=float(days) if days is not None else None,
        generation=int(generation) if generation is not None else None,
    )
    return FileStoreSpec.from_dict(data["store"]), courier_job, float(data["deadline"])


class SpawnCourier:
    """Spawns a courier per refresh (macOS default), handing the job to a warm spare.

    Its couriers open the store ``spec`` names: the spec goes with each job on stdin (a
    spare knows nothing of it until then). ``warm=False`` spawns every courier cold (the
    benchmark's row without a spare). Call ``close`` to let the spare go (tests, the
    benchmark); a daemon that just exits lets it go too: the spare reads EOF. ``life`` (a
    courier's bound from the handover) and ``tick`` (the keeper's look) are shortened by the
    tests; ``interpreter`` is the Python the couriers run (ours).
    """

    def __init__(
        self,
        spec: FileStoreSpec | None,
        *,
        warm: bool = True,
        max_age: float = SPARE_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
        life: float = MAX_LIFE_SECONDS,
        tick: float = KEEPER_TICK_SECONDS,
        interpreter: str = sys.executable,
    ) -> None:
        self._spec = spec
        self._warm = warm
        self._max_age = max_age
        self._clock = clock
        #: A courier's bound from the handover (tests shorten it); the wait is longer.
        self._life = life
        self._tick = min(tick, max_age)
        self._command = courier_command(interpreter)
        self._lock = threading.Lock()
        self._spare: subprocess.Popen[bytes] | None = None
        self._spare_born = 0.0
        self._spare_ready = False
        #: Couriers left to finish alone (timed out) or spares let go: reaped when done.
        self._retired: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        #: Set when there is something for the keeper to do now (a courier let go; close).
        self._nudge = threading.Event()
        self._keeper: threading.Thread | None = None

    # -- the refresh path ------------------------------------------------------------------
    def refresh(self, job: CourierJob) -> CourierResult:
        """Hand ``job`` to the spare (or a cold courier) and wait for its answer."""
        self._reap()
        proc = self._take()
        if proc is None:
            try:
                proc = self._start()
            except OSError as exc:
                # Nothing was sent: the engine counts a failure and backs off. (The OSError
                # names the interpreter's path or a resource, never a token.)
                return CourierResult(
                    CourierKind.NOT_STARTED, f"the courier could not be started: {exc}"
                )
        try:
            return self._hand(proc, job)
        finally:
            if self._warm:
                self._replenish()

    def _hand(self, proc: subprocess.Popen[bytes], job: CourierJob) -> CourierResult:
        """Give ``proc`` its store's spec and job on stdin, wait for its answer; LOST if
        none comes in time."""
        import subprocess

        # The courier's bound counts from now, not from when it reads the job: a spare
        # stopped before reading it must not wake, after we gave up, and send the token.
        message = self._message(job, time.monotonic() + self._life)
        try:
            raw, _ = proc.communicate(message, timeout=self._life + WAIT_MARGIN_SECONDS)
        except subprocess.TimeoutExpired:
            # Left to finish alone, as a forked courier is: its own bound ends it.
            self._retire(proc)
            return _lost("the courier did not answer in time; left to finish alone")
        raw = raw.removeprefix(READY)
        if not raw:
            return _lost("the courier ended without an answer")
        return CourierResult.from_bytes(raw)

    def _start(self) -> subprocess.Popen[bytes]:
        """A new courier, given ``_greeting`` (if any) on stdin before anything else."""
        proc = _spawn(self._command)
        greeting = self._greeting()
        if greeting is not None and proc.stdin is not None:
            # A few hundred bytes: the pipe takes them without blocking. A courier that died
            # already is found so by the refresh (no answer) or by the keeper.
            with contextlib.suppress(OSError):
                proc.stdin.write(len(greeting).to_bytes(4, "big") + greeting)
                proc.stdin.flush()
        return proc

    def _greeting(self) -> bytes | None:
        """What a courier reads before its imports end (FleetCourier: the fleet to open
        ahead); None for a store's courier, which opens its store with the job."""
        return None

    def _message(self, job: CourierJob, deadline: float) -> bytes:
        """The courier's stdin; fleet/courier.py's FleetCourier (``spec`` None) has its own."""
        assert self._spec is not None, "a SpawnCourier without a store spec builds no message"
        return spawn_message(self._spec, job, deadline)

    def _take(self) -> subprocess.Popen[bytes] | None:
        """The spare, if a fresh and living one waits; it is ours alone from here."""
        with self._lock:
            spare, self._spare = self._spare, None
            fresh = self._fresh()
        if spare is None:
            return None
        if spare.poll() is None and fresh:
            return spare
        self._retire(spare)
        return None

    def _fresh(self) -> bool:
        age = self._clock() - self._spare_born
        return 0 <= age <= self._max_age  # a negative age is a clock step: trust neither

    # -- the spare ---------------------------------------------------------------------------
    def prepare(self, timeout: float = WAIT_SECONDS) -> int | None:
        """Start a spare if none waits, and wait until its imports are done; its pid.

        None if it did not get ready in ``timeout`` (it is then let go), or if a refresh
        put another spare in its place meanwhile. The daemon never needs this (the first
        refresh starts the spare); the benchmark and the tests do.
        """
        self._replenish()
        with self._lock:
            spare, ready, born = self._spare, self._spare_ready, self._spare_born
            if spare is None or ready:
                return None if spare is None else spare.pid
            # Out of the slot while we read its stdout: a refresh meanwhile spawns cold
            # rather than share the pipe with us.
            self._spare = None
        fd = spare.stdout.fileno() if spare.stdout is not None else -1
        ready = fd >= 0 and _wait_ready(fd, timeout)
        with self._lock:
            if ready and self._spare is None and not self._stop.is_set():
                self._spare, self._spare_born, self._spare_ready = spare, born, True
                return spare.pid
        self._retire(spare)
        return None

    def _replenish(self) -> None:
        with self._lock:
            spare = self._spare
            if self._stop.is_set() or (
                spare is not None and self._fresh() and spare.poll() is None
            ):
                return
            old, self._spare = spare, None
            # No spare if the start fails (out of processes or descriptors?): the next
            # refresh spawns cold and tries again. Never an error here: the answer is in.
            with contextlib.suppress(OSError):
                self._spare = self._start()
            self._spare_born = self._clock()
            self._spare_ready = False
            if self._keeper is None:
                self._keeper = threading.Thread(
                    target=self._keep, name="courier-spare", daemon=True
                )
                self._keeper.start()
        if old is not None:
            self._retire(old)

    def _keep(self) -> None:
        """Replace a spare that grew too old or died; reap what was let go."""
        while True:
            with self._lock:
                waiting = bool(self._retired)
            self._nudge.wait(min(self._tick, REAP_TICK_SECONDS) if waiting else self._tick)
            self._nudge.clear()
            if self._stop.is_set():
                return
            self._reap()
            with self._lock:
                spare = self._spare
                # poll() reaps a dead spare; out of the slot while prepare() reads it.
                replace = spare is not None and (not self._fresh() or spare.poll() is not None)
            if replace:
                self._replenish()

    def _retire(self, proc: subprocess.Popen[bytes]) -> None:
        """Let a courier go, closing our ends of its pipes: a spare (no job) reads EOF and
        ends; a courier past its deadline finishes alone. Reaped once it has ended."""
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        with contextlib.suppress(OSError):
            if proc.stdout is not None:
                proc.stdout.close()
        with self._lock:
            self._retired.append(proc)
        self._reap()
        self._nudge.set()

    def _reap(self) -> None:
        """Collect couriers that have ended, so none stays a zombie."""
        with self._lock:
            self._retired = [proc for proc in self._retired if proc.poll() is None]

    def close(self, timeout: float = WAIT_SECONDS) -> None:
        """Let the spare go and stop the keeper; wait for let-go couriers (not for ones
        still carrying a job past ``timeout``)."""
        self._stop.set()
        self._nudge.set()
        with self._lock:
            spare, self._spare = self._spare, None
            keeper = self._keeper
        if spare is not None:
            self._retire(spare)
        if keeper is not None:
            keeper.join(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            retired = list(self._retired)
        for proc in retired:
            with contextlib.suppress(Exception):
                proc.wait(max(0.0, deadline - time.monotonic()))
        self._reap()


def _spawn(command: list[str]) -> subprocess.Popen[bytes]:
    """A courier in a session of its own, in ``/``, with none of our descriptors but its
    pipes, and SIGTERM/SIGINT/SIGHUP blocked until spawned.py ignores them."""
    import subprocess  # only the daemon spawns; a courier never needs it

    # The mask is this thread's alone (signals to the daemon go to its other threads) and
    # the child inherits it through exec: a cold courier has its job from its first instant.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _DEAF_SIGNALS)
    try:
        return subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _wait_ready(fd: int, timeout: float) -> bool:
    # A selector, not select.select(): beside a thousand token sockets this descriptor is
    # above 1023, which select() cannot watch.
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        if not selector.select(timeout):
            return False
    return os.read(fd, len(READY)) == READY


# -- the courier's side ------------------------------------------------------------------------
def main() -> int:
    """Entry of a spawned courier: ready on stdout, spec and job on stdin, result on stdout."""
    become_courier(life=0)  # no bound yet: a spare may wait long; it starts with the job
    endpoint = TokenEndpoint()  # its session, built before the clock of a refresh starts
    opened = None
    if FLEET_FLAG in sys.argv[1:]:  # a fleet spare: etcd and the chains opened ahead
        from ..fleet.courier import open_ahead

        opened = open_ahead(sys.stdin.buffer)
    # What the first request would import on the refresh's clock (requests' netrc lookup).
    import encodings.idna  # noqa: F401
    import netrc  # noqa: F401

    with contextlib.suppress(BrokenPipeError):  # let go while importing: EOF below
        os.write(1, READY)
    raw = sys.stdin.buffer.read(MAX_MESSAGE_BYTES + 1)  # to EOF: the daemon closes it
    if not raw:
        return 0  # the daemon let us go (or died) before a job came: nothing touched
    if len(raw) > MAX_MESSAGE_BYTES:
        return _answer(_not_started(f"its message is over {MAX_MESSAGE_BYTES} bytes"))
    data = json.loads(raw)
    job: CourierJob
    if "fleet" in data:  # a fenced refresh (fleet/courier.py): fleet mode only
        from ..fleet.courier import read_fleet_message

        fleet, fleet_job, deadline = read_fleet_message(data)
        job = fleet_job
    else:
        fleet, (spec, job, deadline) = None, read_spawn_message(raw)
    # Armed first, then checked: stopped between the two, the alarm is late by the stop but
    # the check sees the deadline passed. Stopped after the check, the alarm comes due while
    # we are stopped, and SIGCONT ends us (SIGALRM's default) before we run any code.
    left = deadline - time.monotonic()
    if left > 0:
        signal.setitimer(signal.ITIMER_REAL, left)
    if left <= 0 or time.monotonic() >= deadline:
        disarm()
        return _answer(_not_started("it read its job past the job's deadline"))
    if fleet is not None:
        from ..fleet.courier import carry_spawned

        return _answer(
            carry_spawned(fleet, fleet_job, on_answer=disarm, opened=opened, life_ends=deadline)
        )
    return _answer(carry(job, spec.open(), endpoint, time.time, on_answer=disarm))


def _not_started(why: str) -> CourierResult:
    return CourierResult(CourierKind.NOT_STARTED, f"the courier sent nothing: {why}")


def _answer(result: CourierResult) -> int:
    with contextlib.suppress(BrokenPipeError):  # the daemon gave up on us: nobody to tell
        sys.stdout.buffer.write(result.to_bytes())
        sys.stdout.flush()
    return 0

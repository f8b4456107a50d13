"""The spawned courier: a fresh interpreter carries each refresh, and one waits ready.

Where fork is unsafe (macOS, see courier.py) a courier is ``python -m
aac_tokend.refresh.spawn``, reading its store's spec (with the state key) and its job (with
the refresh token) from a pipe on stdin, never from argv or the environment, and writing its
result to stdout.

A fresh interpreter pays for its imports: measured on the 2-core CI machine, a cold spawn
costs ~150-450 ms over an in-process refresh (requests and urllib3 ~100-250 ms,
cryptography ~25-80 ms, site and this package ~50 ms; the range is the load), against a
budget of +100 ms. A refresh needs requests and cryptography, so no trimming gets there.
So one courier is started in advance, a *spare*: it does its imports, leaves the daemon's
session, turns deaf to SIGTERM/SIGINT/SIGHUP, tells the daemon it is ready and blocks on
stdin. A refresh hands its job to the spare (no interpreter start on the refresh path) and
a replacement is started after the answer, off the refresh's clock. The spare's life bound
(SIGALRM, ``MAX_LIFE_SECONDS``) starts when its job arrives. If the daemon dies, the spare
reads EOF and exits at once: it has touched no state.

One spare only: a second refresh running at the same time spawns a cold courier. A spare
runs the code that was on disk when it started, so the keeper thread replaces any spare
older than ``SPARE_MAX_AGE_SECONDS`` (an upgrade in place reaches the couriers within
minutes, even before the daemon restarts).

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
from .endpoint import TokenEndpoint
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
COURIER_MODULE = "aac_tokend.refresh.spawn"
#: The byte a courier writes once its imports are done. Not JSON, so never a result.
READY = b"\x06"
#: A spawn message (the store's spec and the job) is a few hundred bytes; more is not one.
MAX_MESSAGE_BYTES = 65536
#: A spare runs the code on disk when it started: replaced after this long, so an upgrade
#: in place reaches the couriers within minutes. Each replacement costs one interpreter
#: start (~0.3 s of CPU) per 10 minutes, under 0.1 % of one core.
SPARE_MAX_AGE_SECONDS = 600.0
#: How often the keeper looks at the spare's age. Wall-clock age (a suspended laptop's spare
#: is as old as the calendar says), checked often enough to see a clock step soon.
KEEPER_TICK_SECONDS = 30.0


def courier_command() -> list[str]:
    """The argv of a spawned courier: nothing secret, and the same interpreter as ours."""
    # Not -S or -I: skipping site saved ~10 ms of a cold start here (the spare hides start-up
    # anyway), and would skip what site does for the user: .pth hooks (pip-system-certs and
    # the like, which make requests trust a corporate CA), sitecustomize, the user site-packages
    # of a `pip install --user`. -X frozen_modules is already on in release builds.
    return [sys.executable, "-m", COURIER_MODULE]


def _lost(detail: str) -> CourierResult:
    return CourierResult(CourierKind.LOST, detail)


def spawn_message(spec: FileStoreSpec, job: CourierJob) -> bytes:
    """What a spawned courier reads on stdin: where its store is, and its job."""
    data: dict[str, Any] = {
        "store": spec.to_dict(),
        "job": {
            "profile": job.profile,
            "refresh_token": job.refresh_token,
            "lifetime_days": job.lifetime_days,
        },
    }
    return json.dumps(data).encode()


def read_spawn_message(raw: bytes) -> tuple[FileStoreSpec, CourierJob]:
    """The store's spec and the job in a spawned courier's stdin (``spawn_message``)."""
    data = json.loads(raw)
    job = data["job"]
    days = job.get("lifetime_days")
    return FileStoreSpec.from_dict(data["store"]), CourierJob(
        str(job["profile"]),
        str(job["refresh_token"]),
        lifetime_days=float(days) if days is not None else None,
    )


class SpawnCourier:
    """Spawns a courier per refresh (macOS default), handing the job to a warm spare.

    Its couriers open the store ``spec`` names: the spec goes with each job on stdin (a
    spare knows nothing of it until then). ``warm=False`` spawns every courier cold (the
    benchmark's row without a spare). Call ``close`` to let the spare go (tests, the
    benchmark); a daemon that just exits lets it go too: the spare reads EOF.
    """

    def __init__(
        self,
        spec: FileStoreSpec,
        *,
        warm: bool = True,
        max_age: float = SPARE_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spec = spec
        self._warm = warm
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._spare: subprocess.Popen[bytes] | None = None
        self._spare_born = 0.0
        self._spare_ready = False
        #: Couriers left to finish alone (timed out) or spares let go: reaped when done.
        self._retired: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    # -- the refresh path ------------------------------------------------------------------
    def refresh(self, job: CourierJob) -> CourierResult:
        """Hand ``job`` to the spare (or a cold courier) and wait for its answer."""
        self._reap()
        proc = self._take() or _spawn()
        try:
            return self._hand(proc, job)
        finally:
            if self._warm:
                self._replenish()

    def _hand(self, proc: subprocess.Popen[bytes], job: CourierJob) -> CourierResult:
        """Give ``proc`` its store's spec and job on stdin, wait for its answer; LOST if
        none comes in time."""
        import subprocess

        try:
            raw, _ = proc.communicate(spawn_message(self._spec, job), timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            # Left to finish alone, as a forked courier is: its own bound ends it.
            self._retire(proc)
            return _lost("the courier did not answer in time; left to finish alone")
        raw = raw.removeprefix(READY)
        if not raw:
            return _lost("the courier ended without an answer")
        return CourierResult.from_bytes(raw)

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
            if self._stop.is_set() or (self._spare is not None and self._fresh()):
                return
            old, self._spare = self._spare, None
            # No spare if the start fails (out of processes or descriptors?): the next
            # refresh spawns cold and tries again. Never an error here: the answer is in.
            with contextlib.suppress(OSError):
                self._spare = _spawn()
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
        """Replace a spare that grew too old; reap what was let go."""
        while not self._stop.wait(min(KEEPER_TICK_SECONDS, self._max_age)):
            self._reap()
            with self._lock:
                stale = self._spare is not None and not self._fresh()
            if stale:
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

    def _reap(self) -> None:
        """Collect couriers that have ended, so none stays a zombie."""
        with self._lock:
            self._retired = [proc for proc in self._retired if proc.poll() is None]

    def close(self, timeout: float = WAIT_SECONDS) -> None:
        """Let the spare go and stop the keeper; wait for let-go couriers (not for ones
        still carrying a job past ``timeout``)."""
        self._stop.set()
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


def _spawn() -> subprocess.Popen[bytes]:
    """A courier in a session of its own, with none of our descriptors but its pipes."""
    import subprocess  # only the daemon spawns; a courier never needs it

    return subprocess.Popen(
        courier_command(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


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
    # What the first request would import on the refresh's clock (requests' netrc lookup).
    import encodings.idna  # noqa: F401
    import netrc  # noqa: F401

    with contextlib.suppress(BrokenPipeError):  # let go while importing: EOF below
        os.write(1, READY)
    raw = sys.stdin.buffer.read(MAX_MESSAGE_BYTES)
    if not raw:
        return 0  # the daemon let us go (or died) before a job came: nothing touched
    signal.alarm(MAX_LIFE_SECONDS)
    spec, job = read_spawn_message(raw)
    result = carry(job, spec.open(), endpoint, time.time, on_answer=disarm)
    sys.stdout.buffer.write(result.to_bytes())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main()
    # Not sys.exit: the interpreter's teardown takes 50-200 ms here, and the daemon waits
    # for our end (EOF) before it has its answer. What matters is durable and flushed.
    os._exit(code)

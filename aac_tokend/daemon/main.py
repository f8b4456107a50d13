"""The daemon: builds the real objects, runs until SIGTERM/SIGINT, reloads on SIGHUP."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from .. import __version__
from ..core.config import CONFIG_FILENAME, Config
from ..errors import AacTokendError, ConfigError
from ..host.configfile import load_config
from ..host.logs import configure_logging
from ..host.paths import Paths
from ..refresh.courier import MAX_FD, Refresher, default_refresher
from ..serve.control_ops import ControlOps
from ..serve.control_server import ControlServer
from ..serve.token_server import TokenServer
from ..service import sdnotify
from ..service.activation import listen_fds
from ..store.fileio import ensure_private_dir
from ..store.files import FileStoreSpec
from ..store.interface import StateStore
from ..store.opening import store_spec
from ..store.owner import OwnerLock
from .alerts import Alerter
from .engine import Engine
from .fleet_view import SINGLE_HOST, FleetView, join_fleet, same_fleet
from .scheduling import APScheduler, Clock, Scheduler, SystemClock
from .sinks import build_sinks

if TYPE_CHECKING:
    from ..fleet.runtime import FleetRuntime

__all__ = ["Daemon", "run_daemon"]

log = structlog.get_logger("aac_tokend.daemon.main")

#: The main thread wakes this often to notice a stop request; SIGTERM must end us in < 2 s.
MAIN_WAIT_SECONDS = 0.5
#: Every profile's token socket holds a descriptor: at the usual soft limit of 1024 (a login
#: shell's and systemd's default) about a thousand profiles use them all, and then neither
#: the control socket nor a refresh can open one. The hard limit is ours to take, up to
#: this: a forked courier closes the descriptors below 65536 (courier.py).
NOFILE_WANTED = MAX_FD
#: macOS refuses a soft limit above OPEN_MAX (10240) even under an unlimited hard limit.
NOFILE_FALLBACK = 10240
#: If the scheduler thread has not ticked for this long, stop pinging the watchdog so the
#: service manager restarts us (the tick runs every 2 s; 30 s is a hang, not a delay).
SCHEDULER_STALL_SECONDS = 30.0


class Daemon:
    """One instance of aac-tokend serving the profiles under ``paths``."""

    def __init__(
        self,
        paths: Paths,
        *,
        clock: Clock | None = None,
        make_refresher: Callable[[FileStoreSpec], Refresher] | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.paths = paths
        self._clock = clock or SystemClock()
        # Built in _serve, once the key is loaded: a courier opens the store the spec names.
        self._make_refresher = make_refresher or default_refresher
        self._scheduler = scheduler
        self._stop = threading.Event()
        self._sync_lock = threading.Lock()
        self._reload_requested = threading.Event()
        self._last_tick = time.monotonic()
        self._config = Config()
        self._fleet: FleetRuntime | None = None

    def run(self) -> int:
        """Run in the foreground until asked to stop; returns the exit status."""
        # Core dumps would hold every token in plaintext.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _raise_nofile_limit()
        os.umask(0o077)
        self._config = load_config(self.paths.config_dir)
        configure_logging(self._config.log_format, self._config.log_level)
        owner = OwnerLock(self.paths.daemon_lock)
        owner.acquire(on_wait=_waiting_for_offline_command)
        try:
            return self._serve()
        finally:
            owner.release()

    def _serve(self) -> int:
        paths = self.paths
        spec = store_spec(paths)
        store: StateStore = spec.open()
        refresher = self._make_refresher(spec)
        fleet: FleetView = SINGLE_HOST
        if self._config.fleet is not None:  # before any thread of ours: see fleet/runtime.py
            self._fleet = runtime = join_fleet(self._config.fleet, paths, store, refresher)
            store, refresher, fleet = runtime.routed_store, runtime.routed_refresher, runtime
        ensure_private_dir(paths.runtime_dir)
        _check_second_file_system(paths)
        passed = listen_fds()
        sdnotify.claim_environment()  # before any courier: no child may inherit them
        scheduler = self._scheduler or APScheduler()
        self._alerter = Alerter(build_sinks(self._config))
        token_server = TokenServer(
            paths.runtime_dir,
            self,  # current_token below: the engine, once built
            ping=self._watchdog if sdnotify.watchdog_interval() else None,
            ping_interval=sdnotify.watchdog_interval() or 1.0,
        )
        self._engine = engine = Engine(
            store=store,
            refresher=refresher,
            scheduler=scheduler,
            clock=self._clock,
            config=self._config,
            alerter=self._alerter,
            socket_path=token_server.socket_path,
            on_profiles_changed=lambda: self._sync_sockets(token_server, passed),
            fleet=fleet,
        )
        control_listener = passed["control"][0] if passed.get("control") else None
        control = ControlServer(
            paths.control_socket,
            ControlOps(engine, reload=self.reload, shutdown=self._stop.set),
            listener=control_listener,
            waiting_ops=ControlOps.WAITING_OPS,
        )
        token_server.start()
        self._install_signals()
        scheduler.every("__heartbeat__", 2.0, self._heartbeat)
        if self._fleet is not None:
            self._fleet.start(engine.follow)
        engine.start()
        self._sync_sockets(token_server, passed)
        # Only now: a request must see the stored profiles (under socket activation the
        # connection that started us waits in the backlog until here). Before the
        # scheduler: a control socket we cannot bind stops us before any refresh begins.
        control.start()
        scheduler.start()
        sdnotify.ready(f"serving {len(engine.profiles())} profile(s)")
        log.info("daemon_started", pid=os.getpid(), version=__version__,
                 profiles=len(engine.profiles()), runtime_dir=str(paths.runtime_dir))  # fmt: skip
        try:
            while not self._stop.wait(MAIN_WAIT_SECONDS):
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    # A reload must never end the daemon: reload() logged whatever failed,
                    # and the running config stays.
                    with contextlib.suppress(Exception):
                        self.reload()
        finally:
            sdnotify.stopping()
            log.info("daemon_stopping")
            scheduler.shutdown()
            if self._fleet is not None:
                self._fleet.close()  # revokes our lease: another host takes over at once
            control.stop()
            token_server.stop()
        return 0

    # TokenSource, delegated so the token server can start before the engine loads.
    def current_token(self, profile: str) -> bytes | None:
        return self._engine.current_token(profile)

    def _sync_sockets(self, server: TokenServer, passed: dict[str, list[socket.socket]]) -> None:
        # One sync at a time: a profile adopted by another thread (after its courier) between
        # reading `wanted` and `have` would otherwise look unwanted and lose its socket.
        with self._sync_lock:
            wanted = set(self._engine.profiles())
            have = set(server.profiles())
            for name in sorted(wanted - have):
                given = passed.get(f"{name}.token")
                # A copy: removing the profile closes what the server holds, and the passed
                # socket (the manager's, never unlinked) must serve it again if it comes back.
                try:
                    server.add_profile(name, given[0].dup() if given else None)
                except (AacTokendError, OSError) as exc:
                    # One profile's socket (a path too long, a live socket of someone else)
                    # never stops the others: it is refreshed still, and status says why.
                    problem = f"no token socket: {exc}; `aac-tokend token` still works"
                    log.error("token_socket_failed", profile=name, error=str(exc))
                    self._engine.note_socket_problem(name, problem)
                else:
                    self._engine.note_socket_problem(name, None)
            for name in sorted(have - wanted):
                server.remove_profile(name)
        sdnotify.describe(f"serving {len(wanted)} profile(s)")

    def reload(self) -> None:
        """Re-read config.toml; a bad file keeps the running config and is reported."""
        sdnotify.reloading()
        try:
            config = same_fleet(load_config(self.paths.config_dir), self._config, self.paths)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            sdnotify.ready("reload failed; running with the previous config")
            raise
        except Exception as exc:
            # Not one of ours (a parser bug, say): still one line, and the daemon goes on.
            path = self.paths.config_dir / CONFIG_FILENAME
            message = (
                f"config error in {path}: the file could not be loaded "
                f"({type(exc).__name__}); fix it and reload again"
            )
            log.error("reload_failed", error=message)
            sdnotify.ready("reload failed; running with the previous config")
            raise ConfigError(message) from exc
        self._config = config
        configure_logging(config.log_format, config.log_level)
        self._alerter.set_sinks(build_sinks(config))
        self._engine.set_config(config)
        log.info("config_reloaded")
        sdnotify.ready(f"serving {len(self._engine.profiles())} profile(s)")

    def _heartbeat(self) -> None:
        self._last_tick = time.monotonic()

    def _watchdog(self) -> None:
        # Called from the token-serving thread: if it hangs, no ping; if the scheduler
        # hangs, we stop pinging too, and the service manager restarts us.
        if time.monotonic() - self._last_tick < SCHEDULER_STALL_SECONDS:
            sdnotify.watchdog_ping()

    def _install_signals(self) -> None:
        def stop(_sig: int, _frame: FrameType | None) -> None:
            self._stop.set()

        def hup(_sig: int, _frame: FrameType | None) -> None:
            self._reload_requested.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    def request_stop(self) -> None:
        self._stop.set()


def _waiting_for_offline_command(pid: int) -> None:
    """An offline `import`/`remove` holds the owner lock: say so while we wait for it."""
    log.warning("waiting_for_offline_command", pid=pid)
    sdnotify.describe(f"waiting for an offline aac-tokend command (pid {pid}) to finish")


def _raise_nofile_limit() -> None:
    """Take what the hard limit allows of NOFILE_WANTED descriptors (see there)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (NOFILE_WANTED, NOFILE_FALLBACK):
        if hard != resource.RLIM_INFINITY:
            wanted = min(wanted, hard)
        if soft == resource.RLIM_INFINITY or soft >= wanted:
            return
        with contextlib.suppress(ValueError, OSError):  # macOS refuses more than OPEN_MAX
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return


def _check_second_file_system(paths: Paths) -> None:
    """Warn when pending pairs (pending.py) would share the state directory's file system."""
    try:
        same = os.stat(paths.runtime_dir).st_dev == os.stat(paths.state_dir).st_dev
    except OSError:
        return
    if same:
        log.warning(
            "pending_on_state_file_system",
            runtime_dir=str(paths.runtime_dir),
            detail="a failing state disk also fails the pending copy of a new token pair",
        )


def run_daemon(paths: Paths) -> int:
    """Entry of ``aac-tokend run``: once the daemon has stopped, the process exits at once."""
    code = 0
    with contextlib.suppress(KeyboardInterrupt):
        code = Daemon(paths).run()
    # A refresh still in flight belongs to its courier, which outlives us by design. The
    # worker threads waiting for its answer would hold interpreter shutdown (it joins
    # them) for as long as the endpoint takes, up to courier.WAIT_SECONDS: past any stop
    # timeout. Everything of ours is closed and durable by now, so leave without them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

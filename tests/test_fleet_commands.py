"""The fleet commands: the fleet key, move-in and move-out (crash-safe), status.

Against a real 1-member etcd on loopback (one per module, a fresh fleet name per test).
``HookedChains`` is the real ``FleetChains`` with a hook around its writes: a crash is a
``Crash`` (a BaseException, as a SIGKILL is to the code: no handler runs) or a real SIGKILL
of a child process, before or after etcd applied the write.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from aac_tokend.commands.fleet import Fleet
from aac_tokend.commands.fleet_markers import moving_in_path, moving_out_path
from aac_tokend.commands.fleet_move import (
    REMOVE_TRIES,
    move_in,
    move_out,
)
from aac_tokend.commands.fleet_status import fleet_report, status_text
from aac_tokend.core.policy import begin_attempt
from aac_tokend.core.state import InFlight, ProfileState, Rejection, RejectionReason
from aac_tokend.core.tokens import token_hash
from aac_tokend.errors import (
    BusyError,
    EtcdOutcomeUnknownError,
    EtcdUnavailableError,
    EtcdUnsentError,
    FenceLostError,
    InputError,
    ProfileError,
    TransientError,
)
from aac_tokend.fleet.chains import FleetChains, Versioned
from aac_tokend.fleet.etcd import EtcdClient
from aac_tokend.fleet.highwater import HighWater
from aac_tokend.fleet.keys import FleetKeys
from aac_tokend.fleet.records import (
    Attempt,
    ChainRecord,
    encode_record,
    journal_of,
    new_attempt_id,
    with_state,
)
from aac_tokend.fleet.sealing import FLEET_KEY_BYTES, Sealer, load_fleet_key
from aac_tokend.fleet.settings import FleetSettings
from aac_tokend.host.paths import Paths, resolve_paths
from aac_tokend.store.files import FileStore
from aac_tokend.store.opening import open_file_store
from aac_tokend.store.owner import OwnerLock
from aac_tokend.testing import oauth_state
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster
from tests.helpers_e2e import E2EHome, assert_one_line_error

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

_names = itertools.count()
#: The discard port on loopback: nothing listens there on these machines.
DEAD_ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member shared by this module's tests."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1).running() as c:
        yield c


@pytest.fixture
def fleet_name() -> str:
    """A fleet of its own for each test: no test sees another's keys."""
    return f"t{os.getpid()}-{next(_names)}"


class Crash(BaseException):
    """The command's process dies here (no except-Exception handler runs)."""


class HookedChains(FleetChains):
    """The real FleetChains, with a process that dies (or loses etcd's reply) around a write.

    ``crash``/``kill``/``lose`` name an operation and whether it dies (a ``Crash``, or a real
    SIGKILL) or loses etcd's reply before or after etcd applied it; ``before_remove`` lands
    those states (refreshes by another host) just before a remove.
    """

    def __init__(self, client: EtcdClient, fleet: str, state_dir: Path) -> None:
        sealer = Sealer(b"k" * FLEET_KEY_BYTES, fleet)
        super().__init__(client, FleetKeys(fleet), sealer, HighWater(state_dir, fleet))
        self.crash: tuple[str, str] | None = None
        self.kill: tuple[str, str] | None = None
        self.lose: str | None = None
        self.before_remove: list[ProfileState] = []
        #: reads that fail (etcd unreachable) once a create has been applied
        self.reads_failing_after_create = 0

    def _hook(self, op: str, when: str) -> None:
        if self.kill == (op, when):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.crash == (op, when):
            self.crash = None
            raise Crash(f"{op} {when}")
        if when == "after" and self.lose == op:
            self.lose = None
            raise EtcdOutcomeUnknownError("etcd: the reply was lost")
        if when == "before" and self.lose == f"{op}-unsent":
            self.lose = None
            raise EtcdUnsentError("etcd: not sent")

    def put(self, profile: str, record: ChainRecord) -> None:
        """Write a record as an owner's commit would (a refresh, a journal entry)."""
        blob = self.sealer.seal(profile, record.seq, encode_record(record))
        self.client.put(self.keys.chain(profile), blob)

    def read(self, profile: str) -> Versioned | None:
        if self.reads_failing_after_create and self.created:
            self.reads_failing_after_create -= 1
            raise EtcdUnavailableError("etcd: no member answered")
        return super().read(profile)

    created = False

    def create(self, profile: str, state: ProfileState) -> Versioned:
        self._hook("create", "before")
        created = super().create(profile, state)
        self.created = True
        self._hook("create", "after")
        return created

    def remove(self, profile: str, *, expected_revision: int) -> int:
        for state in self.before_remove:
            current = self.read(profile)
            assert current is not None
            self.put(profile, with_state(current.record, state))
        self.before_remove = []
        self._hook("remove", "before")
        revision = super().remove(profile, expected_revision=expected_revision)
        self._hook("remove", "after")
        return revision


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return resolve_paths({"AAC_TOKEND_HOME": str(tmp_path / "home")})


@pytest.fixture
def store(paths: Paths) -> FileStore:
    return open_file_store(paths)


@pytest.fixture
def chains(cluster: EtcdCluster, fleet_name: str, paths: Paths) -> HookedChains:
    return HookedChains(EtcdClient(cluster.endpoints, timeout=3.0), fleet_name, paths.state_dir)


def refreshed(state: ProfileState, n: int) -> ProfileState:
    """``state`` after its nth refresh: a new pair, the old refresh token spent."""
    assert state.refresh_token is not None
    return replace(
        state,
        access_token=f"access-after-{n}-aaaaaaaa",
        refresh_token=f"refresh-after-{n}-rrrrrrrr",
        refresh_count=state.refresh_count + 1,
        spent_rt_hashes=(*state.spent_rt_hashes, token_hash(state.refresh_token)),
    ).bumped()


def local_files(store: FileStore) -> list[str]:
    """The files of the state directory that can hold a chain: states and move markers."""
    kinds = (".state", ".moving", ".moving-out")
    return sorted(p.name for p in store.state_dir.iterdir() if p.name.endswith(kinds))


class TestMoveIn:
    """move-in puts the local chain in etcd and removes the local file, finishing on a rerun."""

    def test_a_local_chain_moves_into_etcd(self, store: FileStore, chains: HookedChains) -> None:
        """The chain is in etcd, the local file is gone, and no marker is left."""
        state = oauth_state()
        store.save(state)
        moved = move_in(store, chains, "work", chains.keys.fleet)
        there = chains.read("work")
        assert there is not None and there.record.state == state and moved.seq == there.record.seq
        assert store.load("work") is None and not moving_in_path(store, "work").exists()
        assert not moved.finished

    @pytest.mark.parametrize("when", ["before", "after"])
    def test_a_crash_at_the_create_leaves_one_copy_and_a_rerun_finishes(
        self, store: FileStore, chains: HookedChains, when: str
    ) -> None:
        """Killed before or after etcd applied the create: the chain is in exactly one of
        etcd and the marker (never both usable, never neither), and a rerun finishes."""
        store.save(oauth_state())
        chains.crash = ("create", when)
        with pytest.raises(Crash):
            move_in(store, chains, "work", chains.keys.fleet)
        assert store.load("work") is None  # the daemon would not serve it meanwhile
        assert moving_in_path(store, "work").exists()
        assert (chains.read("work") is not None) == (when == "after")
        moved = move_in(store, chains, "work", chains.keys.fleet)
        assert moved.finished and chains.read("work") is not None
        assert not moving_in_path(store, "work").exists() and store.load("work") is None

    def test_a_rerun_after_an_owner_refreshed_the_moved_chain_finishes(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """An owner may refresh the chain the moment it lands: the rerun sees it as ours."""
        state = oauth_state()
        store.save(state)
        chains.crash = ("create", "after")
        with pytest.raises(Crash):
            move_in(store, chains, "work", chains.keys.fleet)
        there = chains.read("work")
        assert there is not None
        chains.put("work", with_state(there.record, refreshed(state, 1)))
        assert move_in(store, chains, "work", chains.keys.fleet).finished
        assert not moving_in_path(store, "work").exists()

    def test_a_lost_reply_is_settled_by_the_read(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """An unknown outcome of the create is read back: applied, so the move is done."""
        store.save(oauth_state())
        chains.lose = "create"
        move_in(store, chains, "work", chains.keys.fleet)
        assert chains.read("work") is not None and not moving_in_path(store, "work").exists()

    def test_an_unconfirmed_create_keeps_the_marker_and_a_rerun_finishes(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """The reply lost and etcd unreachable for the confirming read: a one-line 'run it
        again', the chain only in etcd and the marker; the rerun removes the marker."""
        store.save(oauth_state())
        chains.lose, chains.reads_failing_after_create = "create", 1
        with pytest.raises(TransientError, match="fleet move-in work` again"):
            move_in(store, chains, "work", chains.keys.fleet)
        assert local_files(store) == ["work.moving"] and store.load("work") is None
        assert move_in(store, chains, "work", chains.keys.fleet).finished
        assert local_files(store) == [] and chains.read("work") is not None

    def test_a_pair_a_stopped_daemon_could_not_save_is_refused(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """A pending pair is newer than the state file: moving the file would lose it."""
        store.save(oauth_state())
        store.keep_pending("work", store.seal(refreshed(oauth_state(), 1)))
        with pytest.raises(InputError, match="could not save"):
            move_in(store, chains, "work", chains.keys.fleet)
        assert local_files(store) == ["work.state"] and chains.read("work") is None

    def test_a_create_not_sent_gives_the_local_file_back(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """A create that surely did not apply renames the marker back: nothing moved."""
        state = oauth_state()
        store.save(state)
        chains.lose = "create-unsent"
        with pytest.raises(EtcdUnsentError):
            move_in(store, chains, "work", chains.keys.fleet)
        assert store.load("work") == state and not moving_in_path(store, "work").exists()
        assert chains.read("work") is None

    def test_a_profile_already_in_the_fleet_with_another_chain_is_refused(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """Another chain under that name in etcd: refused, and the local file kept as it was."""
        chains.create("work", oauth_state(refresh_token="another-chain-rrrrrrrr"))
        store.save(oauth_state())
        with pytest.raises(InputError, match="already in fleet"):
            move_in(store, chains, "work", chains.keys.fleet)
        assert store.load("work") == oauth_state() and not moving_in_path(store, "work").exists()

    @pytest.mark.parametrize(
        ("change", "words"),
        [
            ({"in_flight": InFlight("abc", 1.0)}, "unresolved refresh"),
            (
                {
                    "rejection": Rejection(
                        RejectionReason.REUSE_SUSPECTED, "invalid_grant", None, 1.0
                    )
                },
                "rejected",
            ),
        ],
    )
    def test_an_unresolved_or_rejected_chain_is_refused(
        self, store: FileStore, chains: HookedChains, change: dict[str, object], words: str
    ) -> None:
        """A journal in flight or a rejected chain stays local, untouched."""
        store.save(oauth_state(**change))
        with pytest.raises(InputError, match=words):
            move_in(store, chains, "work", chains.keys.fleet)
        assert store.load("work") is not None and chains.read("work") is None

    def test_an_old_copy_of_a_chain_in_the_fleet_is_refused(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """A local file restored from a backup after the move: refused, naming `remove`."""
        store.save(oauth_state())
        move_in(store, chains, "work", chains.keys.fleet)
        store.save(oauth_state())  # the old copy, back from a backup
        with pytest.raises(InputError, match="older copy of that chain"):
            move_in(store, chains, "work", chains.keys.fleet)
        assert store.load("work") is not None and local_files(store) == ["work.state"]

    def test_an_unreachable_etcd_leaves_the_local_file_in_place(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """No member answers: an etcd error, and the daemon still finds the state file."""
        dead = EtcdClient([DEAD_ENDPOINT], timeout=1.0, connect_timeout=0.5)
        unreachable = HookedChains(dead, chains.keys.fleet, store.state_dir)
        store.save(oauth_state())
        with pytest.raises(EtcdUnavailableError):
            move_in(store, unreachable, "work", chains.keys.fleet)
        assert store.load("work") == oauth_state() and local_files(store) == ["work.state"]

    def test_no_such_profile_is_named(self, store: FileStore, chains: HookedChains) -> None:
        """A profile with no local state and none in etcd: ProfileError naming it."""
        with pytest.raises(ProfileError, match="no local profile named 'work'"):
            move_in(store, chains, "work", chains.keys.fleet)


def killed_child(home: str, endpoints: list[str], fleet: str, op: str, when: str) -> None:
    """In a child process: move-in (op create) or move-out (op remove) of 'work', SIGKILLed
    by the stand-in before or after etcd applies the write."""
    paths = resolve_paths({"AAC_TOKEND_HOME": home})
    chains = HookedChains(EtcdClient(endpoints, timeout=3.0), fleet, paths.state_dir)
    chains.kill = (op, when)
    (move_in if op == "create" else move_out)(open_file_store(paths), chains, "work", fleet)


class TestKilledMidMove:
    """A real process SIGKILLed at each step of a move: a rerun finishes with one copy."""

    @pytest.mark.parametrize("when", ["before", "after"])
    @pytest.mark.parametrize("op", ["create", "remove"])
    def test_a_rerun_after_sigkill_finishes_the_move(
        self, tmp_path: Path, store: FileStore, chains: HookedChains, op: str, when: str
    ) -> None:
        """Killed before or after etcd applied it, the rerun leaves the chain in one place."""
        if op == "create":
            store.save(oauth_state())
        else:
            chains.create("work", oauth_state())
        code = (
            "import sys; from tests.test_fleet_commands import killed_child; "
            "killed_child(sys.argv[1], sys.argv[2].split(','), *sys.argv[3:])"
        )
        home, endpoints = str(tmp_path / "home"), ",".join(chains.client.endpoints)
        child = subprocess.run(
            [sys.executable, "-c", code, home, endpoints, chains.keys.fleet, op, when],
            capture_output=True, timeout=60, check=False, cwd=Path(__file__).parent.parent,
        )  # fmt: skip
        assert child.returncode == -signal.SIGKILL, child.stderr
        marker = (moving_in_path if op == "create" else moving_out_path)(store, "work")
        assert marker.exists() and store.load("work") is None  # no daemon serves it meanwhile
        mover = move_in if op == "create" else move_out
        assert mover(store, chains, "work", chains.keys.fleet).finished
        in_etcd = chains.read("work") is not None
        assert in_etcd == (op == "create")
        assert local_files(store) == ([] if in_etcd else ["work.state"])


class TestInterruptedMoves:
    """An unfinished move is named: by the other move, which refuses, and by status."""

    def test_a_move_the_other_way_is_refused_until_the_first_is_finished(
        self, store: FileStore, chains: HookedChains, paths: Paths, cluster: EtcdCluster
    ) -> None:
        """A crashed move-in: move-out refuses naming the rerun, status lists it."""
        store.save(oauth_state())
        chains.crash = ("create", "before")
        with pytest.raises(Crash):
            move_in(store, chains, "work", chains.keys.fleet)
        with pytest.raises(InputError, match="fleet move-in work` first"):
            move_out(store, chains, "work", chains.keys.fleet)
        settings = FleetSettings(tuple(cluster.endpoints), chains.keys.fleet)
        report = fleet_report(Fleet(settings, chains.client, chains.keys, chains, paths))
        assert report.interrupted == (("work", "move-in"),)
        assert "interrupted move-in of profile work" in status_text(report)
        assert move_in(store, chains, "work", chains.keys.fleet).finished


class TestMoveOut:
    """move-out writes etcd's chain locally and removes it from etcd, finishing on a rerun."""

    def test_a_fleet_chain_moves_to_a_local_file(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """The local file holds etcd's state, etcd has a tombstone, no marker is left."""
        chains.create("work", oauth_state())
        move_out(store, chains, "work", chains.keys.fleet)
        assert store.load("work") == oauth_state() and chains.read("work") is None
        assert chains.client.get(chains.keys.gone("work")) is not None
        assert local_files(store) == ["work.state"]

    @pytest.mark.parametrize("when", ["before", "after"])
    def test_a_crash_at_the_remove_and_a_rerun_finish_with_one_copy(
        self, store: FileStore, chains: HookedChains, when: str
    ) -> None:
        """Killed before or after etcd applied the remove: no usable local file meanwhile,
        and a rerun leaves the chain in the local file only."""
        chains.create("work", oauth_state())
        chains.crash = ("remove", when)
        with pytest.raises(Crash):
            move_out(store, chains, "work", chains.keys.fleet)
        assert store.load("work") is None and moving_out_path(store, "work").exists()
        moved = move_out(store, chains, "work", chains.keys.fleet)
        assert moved.finished and store.load("work") == oauth_state()
        assert chains.read("work") is None and local_files(store) == ["work.state"]

    def test_a_refresh_between_read_and_remove_is_read_again(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """The owner refreshed meanwhile: the compare fails, and the newest state moves out."""
        chains.create("work", oauth_state())
        newer = refreshed(oauth_state(), 1)
        chains.before_remove = [newer]
        move_out(store, chains, "work", chains.keys.fleet)
        assert store.load("work") == newer and chains.read("work") is None

    def test_a_chain_that_keeps_moving_leaves_no_stale_copy(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """Every try loses the race: a one-line error, etcd keeps the chain, no marker."""

        class Racing(HookedChains):
            def remove(self, profile: str, *, expected_revision: int) -> None:
                raise FenceLostError("moved on")

        racing = Racing(chains.client, chains.keys.fleet, store.state_dir)
        racing.create("work", oauth_state())
        with pytest.raises(FenceLostError, match=f"{REMOVE_TRIES} tries"):
            move_out(store, racing, "work", chains.keys.fleet)
        assert racing.read("work") is not None and local_files(store) == []

    def test_an_unresolved_journal_entry_is_refused(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """A refresh by another host not resolved yet: BusyError naming that host."""
        created = chains.create("work", oauth_state())
        entry = journal_of(
            created.record,
            begin_attempt(oauth_state(), time.time()),
            Attempt(new_attempt_id(), "host-b", 10.0),
        )
        chains.put("work", entry)
        with pytest.raises(BusyError, match="host host-b"):
            move_out(store, chains, "work", chains.keys.fleet)
        assert chains.read("work") is not None and local_files(store) == []

    def test_a_local_profile_of_that_name_is_refused(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """A local chain under that name is never overwritten by the fleet's."""
        chains.create("work", oauth_state())
        local = oauth_state(refresh_token="local-chain-rrrrrrrr")
        store.save(local)
        with pytest.raises(InputError, match="already has a local state file"):
            move_out(store, chains, "work", chains.keys.fleet)
        assert store.load("work") == local and chains.read("work") is not None

    def test_in_and_out_and_in_again_keeps_the_sequence_rising(
        self, store: FileStore, chains: HookedChains
    ) -> None:
        """Moving back in after a move-out starts above the tombstone's sequence."""
        store.save(oauth_state())
        first = move_in(store, chains, "work", chains.keys.fleet)
        move_out(store, chains, "work", chains.keys.fleet)
        again = move_in(store, chains, "work", chains.keys.fleet)
        assert first.seq is not None and again.seq is not None and again.seq > first.seq


class TestStatus:
    """status reports every member's health and each profile's owner, seq and attempt."""

    def test_owner_seq_and_unresolved_attempt_are_shown(
        self, cluster: EtcdCluster, chains: HookedChains, paths: Paths
    ) -> None:
        """An owned chain with a journal out, and an unowned one, each on its own line."""
        created = chains.create("work", oauth_state())
        chains.create("home", oauth_state(profile="home"))
        entry = journal_of(
            created.record,
            begin_attempt(oauth_state(), time.time()),
            Attempt(new_attempt_id(), "host-b", 10.0),
        )
        chains.put("work", entry)
        lease = chains.client.grant(5)
        chains.client.put(chains.keys.owner("work"), b"host-b", lease=lease.id)
        settings = FleetSettings(tuple(cluster.endpoints), chains.keys.fleet)
        fleet = Fleet(settings, chains.client, chains.keys, chains, paths)
        report = fleet_report(fleet)
        rows = {row.profile: row for row in report.profiles}
        assert rows["work"].owner == "host-b" and rows["work"].unresolved_by == "host-b"
        assert rows["work"].seq == entry.seq
        assert rows["home"].owner is None and rows["home"].unresolved_by is None
        assert [m.healthy for m in report.members] == [True]
        text = status_text(report)
        assert 0 < (rows["work"].lease_left or 0) <= lease.ttl
        assert "work  owner host-b (lease" in text and "unresolved attempt by host-b" in text
        assert "home  owner none" in text and report.host in text
        chains.client.revoke(lease.id)

    def test_an_owner_that_is_no_host_name_is_shown_escaped(
        self, cluster: EtcdCluster, chains: HookedChains, paths: Paths
    ) -> None:
        """An owner key written with escape sequences reaches the terminal escaped, not raw."""
        chains.create("work", oauth_state())
        evil = "host-b\x1b[2J\x1b]0;owned\x07\rFAKE LINE"
        chains.client.put(chains.keys.owner("work"), evil.encode())
        settings = FleetSettings(tuple(cluster.endpoints), chains.keys.fleet)
        text = status_text(fleet_report(Fleet(settings, chains.client, chains.keys, chains, paths)))
        assert "\x1b" not in text and "\r" not in text and "\x07" not in text
        assert "owner 'host-b\\x1b[2J" in text
        chains.client.put(chains.keys.owner("work"), b"host-b.example.com")
        text = status_text(fleet_report(Fleet(settings, chains.client, chains.keys, chains, paths)))
        assert "work  owner host-b.example.com  seq" in text

    def test_an_unreachable_etcd_is_said_per_member(
        self, chains: HookedChains, paths: Paths
    ) -> None:
        """No member answers: each is reported unreachable and the profiles' error is set."""
        client = EtcdClient([DEAD_ENDPOINT], timeout=1.0, connect_timeout=0.5)
        settings = FleetSettings((DEAD_ENDPOINT,), chains.keys.fleet)
        report = fleet_report(Fleet(settings, client, chains.keys, chains, paths))
        assert report.members[0].healthy is False and report.error is not None
        assert "cannot be read" in status_text(report)


# -- the command line, as a person runs it -------------------------------------------------


def write_config(home: E2EHome, cluster: EtcdCluster, fleet: str, profiles: str = "") -> None:
    home.paths.config_dir.mkdir(parents=True, exist_ok=True)
    home.paths.config_file.write_text(
        "min_margin_seconds = 100\n"
        f"[fleet]\nendpoints = {cluster.endpoints!r}\nname = {fleet!r}\n{profiles}"
    )


class TestKeyCommands:
    """fleet key create/export/import carry one key between hosts, never through argv."""

    def test_create_export_import_carries_the_same_key(self, home: E2EHome, tmp_path: Path) -> None:
        """Exported through a pipe and imported from stdin, the other host has the same key."""
        assert home.cli("fleet", "key", "create").returncode == 0
        exported = home.cli("fleet", "key", "export")
        assert exported.returncode == 0 and "secret" in exported.stderr
        other = dict(home.env, AAC_TOKEND_HOME=str(tmp_path / "other"))
        imported = home.cli("fleet", "key", "import", input=exported.stdout, env=other)
        assert imported.returncode == 0, str(imported)
        assert load_fleet_key(resolve_paths(other).config_dir) == load_fleet_key(
            home.paths.config_dir
        )

    def test_create_never_overwrites(self, home: E2EHome) -> None:
        """A second create is refused in one line, and the first key stays."""
        home.cli("fleet", "key", "create")
        first = load_fleet_key(home.paths.config_dir)
        assert_one_line_error(home.cli("fleet", "key", "create"), 69)
        assert load_fleet_key(home.paths.config_dir) == first

    def test_export_to_a_terminal_needs_yes_print(self, home: E2EHome) -> None:
        """stdout a terminal: refused (exit 2) and nothing printed, unless --yes-print."""
        home.cli("fleet", "key", "create")
        for extra, code in (((), 2), (("--yes-print",), 0)):
            leader, follower = pty.openpty()
            proc = subprocess.run(
                home.command("fleet", "key", "export", *extra),
                stdout=follower, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                env=home.env, timeout=30,
            )  # fmt: skip
            os.close(follower)
            shown = b""
            while code == 0 and b"\n" not in shown:
                shown += os.read(leader, 1024)
            os.close(leader)
            assert proc.returncode == code, proc.stderr
            assert (b"aacfleetkey1." in shown) == (code == 0)

    def test_export_to_a_regular_file_needs_yes_print(self, home: E2EHome, tmp_path: Path) -> None:
        """stdout a regular file (a secret that stays on disk): refused, exit 2, the file
        empty; with --yes-print it is written."""
        home.cli("fleet", "key", "create")
        for extra, code in (((), 2), (("--yes-print",), 0)):
            target = tmp_path / f"exported{len(extra)}"
            with target.open("wb") as out:
                proc = subprocess.run(
                    home.command("fleet", "key", "export", *extra),
                    stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                    env=home.env, timeout=30,
                )  # fmt: skip
            assert proc.returncode == code, proc.stderr
            assert (b"aacfleetkey1." in target.read_bytes()) == (code == 0)
            if code:
                assert b"not a pipe" in proc.stderr and proc.stderr.count(b"\n") == 1

    def test_importing_again_is_harmless_and_another_key_is_refused(
        self, home: E2EHome, tmp_path: Path
    ) -> None:
        """The same key again: done, exit 0; another fleet's key: refused, exit 69, kept."""
        home.cli("fleet", "key", "create")
        line = home.cli("fleet", "key", "export").stdout
        again = home.cli("fleet", "key", "import", input=line)
        assert again.returncode == 0 and "already installed" in again.stdout
        other = dict(home.env, AAC_TOKEND_HOME=str(tmp_path / "other"))
        home.cli("fleet", "key", "create", env=other)
        foreign = home.cli("fleet", "key", "export", env=other).stdout
        kept = load_fleet_key(home.paths.config_dir)
        assert_one_line_error(home.cli("fleet", "key", "import", input=foreign), 69)
        assert load_fleet_key(home.paths.config_dir) == kept

    def test_a_garbled_import_is_refused_in_one_line(self, home: E2EHome) -> None:
        """Not an export line: one line of error, exit 65, and no key file."""
        result = home.cli("fleet", "key", "import", input="aacfleetkey1.garbage\n")
        assert "garbage" not in assert_one_line_error(result, 65)
        assert not (home.paths.config_dir / "fleet.key").exists()


class TestMoveCommandRefusals:
    """move-in/move-out refuse in one line what they cannot do, before touching anything."""

    def test_no_fleet_table_is_a_config_error(self, home: E2EHome) -> None:
        """Without [fleet] in config.toml: exit 78, naming the file."""
        line = assert_one_line_error(home.cli("fleet", "move-in", "work"), 78)
        assert "[fleet]" in line

    def test_a_profile_outside_fleet_profiles_is_refused(
        self, home: E2EHome, cluster: EtcdCluster, fleet_name: str
    ) -> None:
        """[fleet] profiles does not name it: exit 65, and the local file stays."""
        write_config(home, cluster, fleet_name, 'profiles = ["other"]\n')
        open_file_store(home.paths).save(oauth_state())
        line = assert_one_line_error(home.cli("fleet", "move-in", "work"), 65)
        assert "not in [fleet] profiles" in line and home.state_file("work").exists()

    def test_a_running_daemon_is_named_with_the_way_to_stop_it(
        self, home: E2EHome, cluster: EtcdCluster, fleet_name: str
    ) -> None:
        """The owner lock held as a daemon holds it: exit 3, naming `aac-tokend stop`."""
        write_config(home, cluster, fleet_name)
        open_file_store(home.paths).save(oauth_state())
        lock = OwnerLock(home.paths.daemon_lock)
        lock.acquire()
        try:
            for command in ("move-in", "move-out"):
                line = assert_one_line_error(home.cli("fleet", command, "work"), 3)
                assert "aac-tokend stop" in line and f"aac-tokend fleet {command} work`" in line
        finally:
            lock.release()
        assert home.state_file("work").exists()


class TestCommandLineRoundTrip:
    """As a person runs them, with the real FleetChains: in, status, out, and no token shown."""

    def test_move_in_status_move_out(
        self, home: E2EHome, cluster: EtcdCluster, fleet_name: str
    ) -> None:
        """The chain goes to etcd and back unchanged; status names it; no output has a token."""
        write_config(home, cluster, fleet_name)
        assert home.cli("fleet", "key", "create").returncode == 0
        state = oauth_state()
        open_file_store(home.paths).save(state)
        moved = home.cli("fleet", "move-in", "work")
        assert moved.returncode == 0 and "is in fleet" in moved.stdout, str(moved)
        assert not home.state_file("work").exists()
        shown = home.cli("fleet", "status")
        assert shown.returncode == 0 and "work  owner none  seq" in shown.stdout, str(shown)
        report = json.loads(home.cli("fleet", "status", "--json").stdout)
        assert [p["profile"] for p in report["profiles"]] == ["work"]
        assert report["fleet"] == fleet_name and report["etcd"][0]["healthy"] is True
        back = home.cli("fleet", "move-out", "work")
        assert back.returncode == 0, str(back)
        loaded = open_file_store(home.paths).load("work")
        assert loaded is not None and loaded.refresh_token == state.refresh_token
        assert home.cli("fleet", "move-out", "work").returncode == 65  # a local file now
        for _label, text in home.outputs:
            assert state.access_token not in text and str(state.refresh_token) not in text


def test_the_fleet_command_is_in_the_help() -> None:
    """`aac-tokend --help` lists fleet; the etcd client is not imported to say so."""
    code = (
        "import sys; from aac_tokend.commands.main import build_parser; "
        "h = build_parser().format_help(); assert 'fleet' in h, h; "
        "assert 'aac_tokend.fleet.etcd' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)

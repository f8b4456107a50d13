"""What the engine asks of fleet mode, and a single host's answers.

The engine runs the same code for every profile. For a profile in a fleet (fleet/ on etcd,
issue #13) it asks three things more: may this host refresh it now (only its elected owner
may), how much earlier than its expiry to stop serving it (expiry times come from the
owner's clock, so by the fleet's maximum clock skew), and what to show in ``status``. A
follower's state arrives from the fleet's watch (``Engine.follow``), never by refreshing.
A journal entry found in a fleet profile's state is never recovered by the engine: another
host's courier may be sending it; the fenced courier resolves it after W (fleet/fenced.py).

``SINGLE_HOST`` answers for a daemon without a ``[fleet]`` table: no profile is in a fleet,
and the engine behaves exactly as before fleet mode existed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ..core.config import CONFIG_FILENAME, Config
from ..errors import ConfigError
from ..host.paths import Paths
from ..refresh.courier import Refresher
from ..store.interface import StateStore

if TYPE_CHECKING:
    from ..fleet.runtime import FleetRuntime
    from ..fleet.settings import FleetSettings

__all__ = ["SINGLE_HOST", "FleetView", "SingleHost", "join_fleet", "same_fleet"]


class FleetView(Protocol):
    """Fleet mode as the engine sees it."""

    def covers(self, name: str) -> bool:
        """True if ``name``'s chain lives in the fleet (in etcd), not in a local file."""
        ...

    def may_refresh(self, name: str) -> bool:
        """True while this host owns ``name``'s chain: only then may it start a refresh."""
        ...

    def serve_margin(self, name: str) -> float:
        """Seconds before a token's expiry that serving it stops, beyond the usual margin."""
        ...

    def facts(self, name: str) -> dict[str, Any] | None:
        """The ``fleet`` object of ``name``'s status row (None: not in a fleet)."""
        ...


class SingleHost:
    """No fleet: every profile is this host's alone."""

    def covers(self, name: str) -> bool:
        return False

    def may_refresh(self, name: str) -> bool:
        return True

    def serve_margin(self, name: str) -> float:
        return 0.0

    def facts(self, name: str) -> dict[str, Any] | None:
        return None


SINGLE_HOST = SingleHost()


def join_fleet(
    settings: FleetSettings, paths: Paths, store: StateStore, refresher: Refresher
) -> FleetRuntime:
    """Fleet mode's parts, routing the covered profiles to etcd and the rest to ``store``
    and ``refresher``. Imported only here, so a daemon without a [fleet] table never loads
    the etcd client; call it before any thread starts (fleet/runtime.py says why)."""
    from ..fleet.runtime import FleetRuntime

    return FleetRuntime(settings, paths, local_store=store, local_refresher=refresher)


def same_fleet(config: Config, running: Config, paths: Paths) -> Config:
    """A reloaded ``config``, unless it changes the ``[fleet]`` table: the etcd client, the
    lease and the election are built once, before any thread (fleet/runtime.py)."""
    if config.fleet != running.fleet:
        raise ConfigError(
            f"config error in {paths.config_dir / CONFIG_FILENAME}: the [fleet] table changed; "
            "a reload cannot change fleet mode: restart the daemon (`aac-tokend stop`, then "
            "start it again) to apply it"
        )
    return config

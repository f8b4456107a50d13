"""The [fleet] table of config.toml: defaults, one-line errors, and the failover margin check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aac_tokend.core.config import CONFIG_FILENAME, parse_config
from aac_tokend.core.policy import PolicySettings
from aac_tokend.errors import ConfigError
from aac_tokend.fleet.settings import KNOWN_KEYS, FleetSettings, check_margins, parse_fleet
from aac_tokend.host.configfile import load_config
from aac_tokend.refresh import courier, endpoint

ROOT = Path(__file__).resolve().parents[1]
BASE = {"endpoints": ["https://etcd1:2379", "https://etcd2:2379"], "name": "prod"}

#: Every timing scaled down for a test cluster (the issue: by configuration, not by code).
SCALED = """\
min_margin_seconds = 5
[fleet]
endpoints = ["http://127.0.0.1:23790", "http://127.0.0.1:23791", "http://[::1]:23792"]
name = "test-fleet"
lease_ttl_seconds = 2
send_window_seconds = 0.3
resolve_wait_seconds = 1.5
max_clock_skew_seconds = 0.2
keepalive_fraction = 0.25
courier_life_seconds = 1.4
connect_timeout_seconds = 0.3
send_timeout_seconds = 0.3
request_deadline_seconds = 1.0
"""


def fleet(**changes: object) -> dict[str, object]:
    """The minimal table with ``changes`` applied (None removes a key)."""
    table = {**BASE, **changes}
    return {k: v for k, v in table.items() if v is not None}


def refused(table: object) -> str:
    """The error message parse_fleet gives for ``table``; fails if it is accepted."""
    with pytest.raises(ConfigError) as caught:
        parse_fleet(table, "config.toml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("config error in config.toml: key ")
    return message


class TestDefaults:
    """A table with only endpoints and name takes the defaults, and they hold together."""

    def test_minimal_table_takes_the_defaults(self) -> None:
        """endpoints and name alone give FleetSettings' defaults, profiles all."""
        settings = parse_fleet(fleet(), "config.toml")
        assert settings == FleetSettings(endpoints=tuple(BASE["endpoints"]), name="prod")
        assert settings.covers("anything")

    def test_default_arithmetic(self) -> None:
        """The defaults meet each relation: W >= life, W >= D + connect + send, margin 100."""
        s = parse_fleet(fleet(), "config.toml")
        assert s.resolve_wait_seconds >= s.courier_life_seconds
        assert s.resolve_wait_seconds >= (
            s.send_window_seconds + s.connect_timeout_seconds + s.send_timeout_seconds
        )
        assert s.courier_life_seconds >= s.send_window_seconds + s.request_deadline_seconds
        assert s.required_margin_seconds() == 10 + 60 + 25 + 5

    def test_defaults_match_the_single_host_courier(self) -> None:
        """The courier timings default to the constants of refresh/courier.py and endpoint.py."""
        s = FleetSettings(endpoints=("https://e:1",), name="f")
        assert s.courier_life_seconds == courier.MAX_LIFE_SECONDS
        assert s.connect_timeout_seconds == endpoint.CONNECT_TIMEOUT_SECONDS
        assert s.request_deadline_seconds == endpoint.TOTAL_DEADLINE_SECONDS

    def test_defaults_pass_with_a_margin_that_fits(self) -> None:
        """config.toml with the fleet defaults and min_margin_seconds = 100 is accepted."""
        text = 'min_margin_seconds = 100\n[fleet]\nendpoints = ["https://e1:2379"]\nname = "p"\n'
        assert parse_config(text).fleet == FleetSettings(endpoints=("https://e1:2379",), name="p")

    def test_every_key_is_accepted(self) -> None:
        """A table setting every known key parses, each value where it belongs."""
        table = fleet(
            ca_file="/etc/etcd/ca.pem",
            cert_file="/etc/etcd/me.pem",
            key_file="/etc/etcd/me.key",
            user="tokend",
            password_file="/home/me/.config/aac-tokend/etcd.password",
            profiles=["work", "lab"],
            host="build-1",
            lease_ttl_seconds=15,
            send_window_seconds=5,
            resolve_wait_seconds=90,
            max_clock_skew_seconds=1,
            keepalive_fraction=0.25,
            courier_life_seconds=50,
            connect_timeout_seconds=5,
            send_timeout_seconds=5,
            request_deadline_seconds=25,
        )
        assert set(table) == set(KNOWN_KEYS)
        s = parse_fleet(table, "config.toml")
        assert (s.profiles, s.user, s.lease_ttl_seconds) == (("work", "lab"), "tokend", 15)
        assert s.host == "build-1"
        assert s.covers("work") and not s.covers("other")


class TestHook:
    """load_config returns the fleet settings, and without [fleet] nothing loads fleet/."""

    def test_absent_table_is_none(self) -> None:
        """A config without [fleet] has fleet None."""
        assert parse_config("min_margin_seconds = 30\n").fleet is None

    def test_load_config_reads_the_table(self, tmp_path: Path) -> None:
        """load_config on a real file returns the parsed, scaled-down fleet settings."""
        (tmp_path / CONFIG_FILENAME).write_text(SCALED)
        fleet_settings = load_config(tmp_path).fleet
        assert fleet_settings is not None and fleet_settings.lease_ttl_seconds == 2

    def test_error_names_the_real_file(self, tmp_path: Path) -> None:
        """A bad fleet value read from a file names that file."""
        path = tmp_path / CONFIG_FILENAME
        path.write_text('[fleet]\nendpoints = []\nname = "p"\n')
        with pytest.raises(ConfigError, match=f"config error in {path}: key 'fleet.endpoints'"):
            load_config(tmp_path)

    def test_fleet_mode_off_imports_nothing_of_fleet(self) -> None:
        """Parsing a config without [fleet] does not import aac_tokend.fleet."""
        script = (
            "import sys\n"
            "from aac_tokend.core.config import parse_config\n"
            "parse_config('min_margin_seconds = 30\\n')\n"
            "print(sorted(m for m in sys.modules if m.startswith('aac_tokend.fleet')))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]"

    def test_a_non_table_is_refused(self) -> None:
        """fleet = "x" at the top level is refused as not a table."""
        with pytest.raises(ConfigError, match="key 'fleet' must be a table"):
            parse_config('fleet = "on"\n')


class TestBadValues:
    """Each bad value is one line naming the dotted key and what is allowed."""

    @pytest.mark.parametrize(
        ("changes", "key", "words"),
        [
            ({"endpoints": None}, "fleet.endpoints", "is missing"),
            ({"name": None}, "fleet.name", "is missing"),
            ({"endpoints": []}, "fleet.endpoints", "array of 1 to 16"),
            ({"endpoints": "https://e:2379"}, "fleet.endpoints", "array"),
            ({"endpoints": ["https://e"]}, "fleet.endpoints", "scheme, host and port"),
            ({"endpoints": ["etcd1:2379"]}, "fleet.endpoints", "etcd client URLs"),
            ({"endpoints": ["ftp://e:21"]}, "fleet.endpoints", "scheme, host and port"),
            ({"endpoints": ["https://e:2379/v3"]}, "fleet.endpoints", "without a path"),
            ({"endpoints": ["https://e:99999"]}, "fleet.endpoints", "etcd client URLs"),
            ({"endpoints": ["http://etcd1:2379"]}, "fleet.endpoints", "http is for loopback"),
            ({"endpoints": ["http://10.0.0.1:2379"]}, "fleet.endpoints", "http is for loopback"),
            ({"endpoints": ["https://e:1", "https://e:1"]}, "fleet.endpoints", "twice"),
            ({"name": "Prod"}, "fleet.name", "lowercase"),
            ({"name": "a/b"}, "fleet.name", "lowercase"),
            ({"name": ".."}, "fleet.name", "lowercase"),
            ({"name": "-x"}, "fleet.name", "lowercase"),
            ({"name": "x" * 64}, "fleet.name", "a 64-char string"),
            ({"name": 7}, "fleet.name", "got 7"),
            ({"ca_file": "etc/ca.pem"}, "fleet.ca_file", "absolute file path"),
            ({"user": ""}, "fleet.user", "etcd user name"),
            ({"profiles": "some"}, "fleet.profiles", '"all" or an array'),
            ({"profiles": []}, "fleet.profiles", '"all" or an array'),
            ({"profiles": ["ok", 3]}, "fleet.profiles", "got 3 in it"),
            ({"profiles": ["../x"]}, "fleet.profiles", "unusable profile"),
            ({"profiles": ["a", "a"]}, "fleet.profiles", "twice"),
            ({"lease_ttl_seconds": 2.5}, "fleet.lease_ttl_seconds", "whole number"),
            ({"lease_ttl_seconds": 0}, "fleet.lease_ttl_seconds", "from 1 to 3600"),
            ({"lease_ttl_seconds": True}, "fleet.lease_ttl_seconds", "got true"),
            ({"send_window_seconds": 0}, "fleet.send_window_seconds", "from 0.05"),
            ({"resolve_wait_seconds": float("nan")}, "fleet.resolve_wait_seconds", "nan"),
            ({"max_clock_skew_seconds": -1}, "fleet.max_clock_skew_seconds", "from 0 to"),
            ({"keepalive_fraction": 0.6}, "fleet.keepalive_fraction", "from 0.1 to 0.5"),
            ({"request_deadline_seconds": "25"}, "fleet.request_deadline_seconds", "'25'"),
        ],
    )
    def test_bad_value(self, changes: dict[str, object], key: str, words: str) -> None:
        """The error names the key and says what is allowed."""
        message = refused(fleet(**changes))
        assert f"key {key!r}" in message and words in message

    def test_unknown_key_gets_a_suggestion(self) -> None:
        """A misspelt key is refused with the nearest known one."""
        message = refused(fleet(lease_ttl=10))
        assert "'fleet.lease_ttl' is not known; did you mean 'lease_ttl_seconds'?" in message

    @pytest.mark.parametrize(
        "url",
        [
            "https://etcd one:2379",
            "http://127.0.0.1:\t2379",
            "https://etcd1\x0b.example:2379",
            "https://etcd1\x1b[2J:2379",
            "https://etcd1\\@evil:2379",
        ],
    )
    def test_whitespace_and_control_characters_in_an_endpoint_are_refused(self, url: str) -> None:
        """As for the token endpoint: refused in one line, and no control character echoed."""
        message = refused(fleet(endpoints=[url]))
        assert "whitespace or a control character" in message and "fleet.endpoints" in message
        assert message.isprintable()

    def test_credentials_in_an_endpoint_are_refused_unquoted(self) -> None:
        """user:password@ in a URL is refused, pointing at user and password_file, unquoted."""
        message = refused(fleet(endpoints=["https://root:hunter2@e:2379"]))
        assert "password_file" in message and "hunter2" not in message

    @pytest.mark.parametrize(
        ("changes", "key", "needs"),
        [
            ({"cert_file": "/c.pem"}, "fleet.cert_file", "fleet.key_file"),
            ({"key_file": "/c.key"}, "fleet.key_file", "fleet.cert_file"),
            ({"user": "u"}, "fleet.user", "fleet.password_file"),
            ({"password_file": "/p"}, "fleet.password_file", "fleet.user"),
        ],
    )
    def test_half_a_pair_is_refused(self, changes: dict[str, object], key: str, needs: str) -> None:
        """A client certificate without its key, or a user without a password file, is refused."""
        message = refused(fleet(**changes))
        assert f"key {key!r} needs {needs} too" in message

    def test_tls_options_without_https_are_refused(self) -> None:
        """ca_file with only http endpoints would be ignored: refused."""
        message = refused(fleet(endpoints=["http://127.0.0.1:2379"], ca_file="/ca.pem"))
        assert "is for https endpoints" in message

    def test_loopback_http_is_allowed(self) -> None:
        """http to 127.0.0.1, ::1 and localhost is allowed, for tests and the demo."""
        urls = ["http://127.0.0.1:1", "http://[::1]:2", "http://localhost:3"]
        assert parse_fleet(fleet(endpoints=urls), "c").endpoints == tuple(urls)

    @given(st.dictionaries(st.sampled_from([*KNOWN_KEYS, "password", "x"]), st.from_type(object)))
    def test_untrusted_tables_give_settings_or_errors(self, table: dict[str, object]) -> None:
        """Whatever the table holds, parse_fleet returns settings or raises one ConfigError."""
        try:
            parse_fleet(table, "c")
        except ConfigError as exc:
            assert "\n" not in str(exc)


class TestInlinePassword:
    """A password in config.toml is refused, saying to use password_file, without echoing it."""

    def test_refused(self) -> None:
        """fleet.password is refused with a one-line pointer to password_file."""
        message = refused(fleet(user="u", password="s3cret-value"))
        assert "key 'fleet.password' is refused" in message and "password_file" in message
        assert "s3cret" not in message

    def test_refused_from_the_file(self, tmp_path: Path) -> None:
        """The same refusal comes through load_config."""
        (tmp_path / CONFIG_FILENAME).write_text(SCALED + 'password = "s3cret"\n')
        with pytest.raises(ConfigError, match=r"fleet\.password_file") as caught:
            load_config(tmp_path)
        assert "s3cret" not in str(caught.value)


class TestRelations:
    """The timings must hold together; each refusal names its numbers and what to change."""

    def test_wait_below_the_courier_life(self) -> None:
        """W below the courier's life is refused."""
        message = refused(fleet(resolve_wait_seconds=40))
        assert "'fleet.resolve_wait_seconds' (40) must be at least courier_life_seconds (50)" in (
            message
        )

    def test_wait_below_window_and_timeouts(self) -> None:
        """W below D + connect + send is refused with the sum written out."""
        message = refused(
            fleet(resolve_wait_seconds=60, send_window_seconds=30, send_timeout_seconds=30)
        )
        assert "= 30 + 5 + 30 = 65; raise it or lower those" in message

    def test_courier_life_below_window_and_deadline(self) -> None:
        """A courier life that would cut a request sent in time is refused."""
        message = refused(fleet(courier_life_seconds=30))
        assert "'fleet.courier_life_seconds' (30) must be at least" in message
        assert "= 10 + 25 = 35" in message


class TestMargin:
    """The refresh margin of every fleet profile must leave room for a failover."""

    def test_default_margin_is_too_small(self) -> None:
        """The default 60 s margin is refused under the default fleet, with the arithmetic."""
        with pytest.raises(ConfigError) as caught:
            parse_config('[fleet]\nendpoints = ["https://e:1"]\nname = "p"\n')
        assert "key 'min_margin_seconds' (60) leaves no room for a fleet failover" in str(
            caught.value
        )
        assert "= 10 + 60 + 25 + 5 = 100; raise it or lower those" in str(caught.value)

    def test_scaled_down_test_configuration_passes(self) -> None:
        """A test cluster's configuration, every timing scaled down, is accepted."""
        settings = parse_config(SCALED).fleet
        assert settings is not None
        assert settings.required_margin_seconds() == pytest.approx(2 + 1.5 + 1.0 + 0.2)

    def test_scaled_down_margin_too_small_is_refused(self) -> None:
        """The minimum follows the scaled settings: 4.6 s is refused where 4.7 is needed."""
        with pytest.raises(ConfigError, match=r"\(4.6\) leaves no room .* = 4.7;"):
            parse_config(SCALED.replace("min_margin_seconds = 5", "min_margin_seconds = 4.6"))

    def test_a_profile_override_is_blamed(self) -> None:
        """A fleet profile's own too-small margin is named by its dotted key."""
        text = SCALED + "[profiles.work]\nmin_margin_seconds = 3\n"
        with pytest.raises(ConfigError, match=r"key 'profiles\.work\.min_margin_seconds' \(3\)"):
            parse_config(text)

    def test_profiles_outside_the_fleet_are_not_checked(self) -> None:
        """With fleet.profiles listed, only those profiles' margins count."""
        top = PolicySettings(min_margin_seconds=1)
        s = parse_fleet(fleet(profiles=["work"]), "c")
        check_margins(s, top, {"work": PolicySettings(min_margin_seconds=100)}, "c")
        with pytest.raises(ConfigError, match=r"key 'profiles\.work\.min_margin_seconds'"):
            check_margins(s, top, {"work": PolicySettings(min_margin_seconds=99)}, "c")

    def test_listed_profile_without_a_table_uses_the_top_level(self) -> None:
        """A listed profile without [profiles.NAME] is held to the top-level margin."""
        s = parse_fleet(fleet(profiles=["work", "lab"]), "c")
        work = {"work": PolicySettings(min_margin_seconds=100)}
        with pytest.raises(ConfigError, match=r"key 'min_margin_seconds' \(60\)"):
            check_margins(s, PolicySettings(), work, "c")


class TestPurity:
    """fleet.settings is as pure as core, since core.config calls it."""

    def test_imports_only_core_errors_and_pure_stdlib(self) -> None:
        """fleet/settings.py imports no I/O, clock or library, and nothing of aac_tokend
        beyond core and errors."""
        from tests.test_layout import IMPURE, PACKAGE, imports_of, resolved, subpackage

        bad = [
            i
            for i in imports_of(PACKAGE / "fleet" / "settings.py")
            if (
                i.target.startswith("aac_tokend")
                and subpackage(resolved(i)) not in ("core", "errors")
            )
            or (
                not i.target.startswith("aac_tokend")
                and (
                    i.target.split(".")[0] in IMPURE
                    or i.target.split(".")[0] not in sys.stdlib_module_names
                )
            )
        ]
        assert not bad, bad

"""config.toml: defaults, values, one-line errors naming key and file, and fuzzing."""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend.core.config import (
    CONFIG_FILENAME,
    MAX_CONFIG_BYTES,
    POLICY_RANGES,
    Config,
    parse_config,
)
from aac_tokend.core.policy import PolicySettings
from aac_tokend.errors import ConfigError
from aac_tokend.host.configfile import load_config

#: The example in the README's Configuration section; kept identical to it.
README_EXAMPLE = """\
# ~/.config/aac-tokend/config.toml
refresh_fraction = 0.75
min_margin_seconds = 60
backoff_first_seconds = 2
backoff_cap_seconds = 300
refresh_lifetime_days = 90

on_alert = ["/home/me/bin/aac-alert", "--via", "mail"]
alert_timeout_seconds = 10
notifications = true
log_format = "auto"
log_level = "info"

[profiles.work]          # this profile's tokens live 30 days and refresh at half-life
refresh_fraction = 0.5
refresh_lifetime_days = 30

[profiles.lab]           # retry this one at least every minute
backoff_cap_seconds = 60
"""


def write(config_dir: Path, text: str | bytes) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / CONFIG_FILENAME
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"config error in {path}: ")
    return message


class TestDefaults:
    def test_missing_file_means_defaults(self, tmp_path: Path) -> None:
        """No config.toml (or no config directory at all) gives every default."""
        assert load_config(tmp_path) == Config()
        assert load_config(tmp_path / "absent") == Config()

    def test_empty_file_means_defaults(self, tmp_path: Path) -> None:
        """An empty config.toml gives every default."""
        write(tmp_path, "")
        assert load_config(tmp_path) == Config()

    def test_defaults_are_the_documented_ones(self) -> None:
        """The defaults are those the README documents, and the policy's own."""
        config = Config()
        assert config.policy == PolicySettings()
        assert config.policy.refresh_fraction == 0.75
        assert config.policy.min_margin_seconds == 60
        assert config.policy.backoff_first_seconds == 2
        assert config.policy.backoff_cap_seconds == 300
        assert config.policy.refresh_lifetime_days is None
        assert dict(config.profile_policies) == {}
        assert config.on_alert is None
        assert config.alert_timeout_seconds == 10
        assert config.notifications is True
        assert (config.log_format, config.log_level) == ("auto", "info")

    def test_every_policy_key_is_a_policy_field(self) -> None:
        """Each policy key names a PolicySettings field; only jitter_fraction stays internal."""
        names = {f.name for f in fields(PolicySettings)}
        assert set(POLICY_RANGES) <= names
        assert names - set(POLICY_RANGES) == {"jitter_fraction"}


class TestValues:
    def test_readme_example_loads(self, tmp_path: Path) -> None:
        """The README's example sets every key and loads to the values it shows."""
        write(tmp_path, README_EXAMPLE)
        config = load_config(tmp_path)
        assert config.policy == PolicySettings(refresh_lifetime_days=90.0)
        assert config.on_alert == ("/home/me/bin/aac-alert", "--via", "mail")
        assert config.alert_timeout_seconds == 10.0
        assert config.notifications is True
        assert config.policy_for("work") == PolicySettings(
            refresh_fraction=0.5, refresh_lifetime_days=30.0
        )
        assert config.policy_for("lab") == PolicySettings(
            backoff_cap_seconds=60.0, refresh_lifetime_days=90.0
        )

    def test_profile_overrides_merge_over_top_level(self) -> None:
        """A profile table overrides only its own keys; the rest come from the top level."""
        config = parse_config("min_margin_seconds = 120\n[profiles.a]\nrefresh_fraction = 0.5\n")
        assert config.policy_for("a") == PolicySettings(
            refresh_fraction=0.5, min_margin_seconds=120.0
        )

    def test_unknown_profile_gets_top_level_policy(self) -> None:
        """A profile without a table uses the top-level policy."""
        config = parse_config("refresh_fraction = 0.6\n[profiles.a]\n")
        assert config.policy_for("other") is config.policy
        assert config.policy_for("a") == config.policy

    def test_profile_policies_are_read_only(self) -> None:
        """The profile mapping of a frozen Config cannot be changed after loading."""
        config = parse_config("[profiles.a]\nrefresh_fraction = 0.5\n")
        with pytest.raises(TypeError):
            config.profile_policies["b"] = PolicySettings()  # type: ignore[index]

    def test_on_alert_string_is_split_like_a_shell(self) -> None:
        """A string command is split with shell quoting rules but never run by a shell."""
        config = parse_config("on_alert = \"/bin/hook --subject 'token alert' $HOME;x\"\n")
        assert config.on_alert == ("/bin/hook", "--subject", "token alert", "$HOME;x")

    def test_integers_and_fractions_are_numbers(self) -> None:
        """Integers are accepted where numbers are asked, and a day may be fractional."""
        config = parse_config("min_margin_seconds = 0\nrefresh_lifetime_days = 1.5\n")
        assert config.policy.min_margin_seconds == 0.0
        assert config.policy.refresh_lifetime_days == 1.5

    def test_bounds_are_inclusive(self) -> None:
        """Each range includes its ends, except refresh_lifetime_days' zero."""
        config = parse_config(
            "refresh_fraction = 0.95\nmin_margin_seconds = 3600\nbackoff_first_seconds = 60\n"
            "backoff_cap_seconds = 3600\nrefresh_lifetime_days = 365\n"
            "alert_timeout_seconds = 300\n"
        )
        assert config.policy.refresh_lifetime_days == 365.0
        assert config.alert_timeout_seconds == 300.0

    def test_other_settings(self) -> None:
        """notifications, log_format and log_level take their documented values."""
        config = parse_config('notifications = false\nlog_format = "json"\nlog_level = "debug"\n')
        assert (config.notifications, config.log_format, config.log_level) == (
            False,
            "json",
            "debug",
        )


class TestRejectedValues:
    @pytest.mark.parametrize(
        ("text", "key", "allowed"),
        [
            ("refresh_fraction = true", "refresh_fraction", "(got true)"),
            ("refresh_fraction = 0.96", "refresh_fraction", "from 0.1 to 0.95"),
            ("refresh_fraction = nan", "refresh_fraction", "(got nan)"),
            ('refresh_fraction = "0.5"', "refresh_fraction", "(got '0.5')"),
            ("min_margin_seconds = -1", "min_margin_seconds", "from 0 to 3600"),
            ("min_margin_seconds = inf", "min_margin_seconds", "(got inf)"),
            ("backoff_first_seconds = 0.05", "backoff_first_seconds", "from 0.1 to 60"),
            ("backoff_cap_seconds = 3601", "backoff_cap_seconds", "from 1 to 3600"),
            ("refresh_lifetime_days = 0", "refresh_lifetime_days", "from 1 to 365"),
            ("refresh_lifetime_days = 0.5", "refresh_lifetime_days", "from 1 to 365"),
            ("refresh_lifetime_days = 366", "refresh_lifetime_days", "from 1 to 365"),
            ("alert_timeout_seconds = 0.5", "alert_timeout_seconds", "from 1 to 300"),
            ("notifications = 1", "notifications", "true or false"),
            ('log_format = "text"', "log_format", "one of auto, json, console"),
            ('log_level = "INFO"', "log_level", "one of debug, info, warning, error"),
            ("on_alert = 3", "on_alert", "an array of strings or one string"),
            ('on_alert = ["a", 1]', "on_alert", "an array of strings"),
            ("on_alert = []", "on_alert", "not empty"),
            ('on_alert = ""', "on_alert", "not empty"),
            ('on_alert = "hook \'unclosed"', "on_alert", "balanced quotes"),
            ('on_alert = ["hook\\u0000x"]', "on_alert", "NUL"),
            ("profiles = 3", "profiles", "must be a table"),
            ("[profiles]\nwork = 3", "profiles.work", "must be a table"),
            ("[profiles.work]\nrefresh_fraction = 2", "profiles.work.refresh_fraction", "0.95"),
            ("[profiles.work]\nnotifications = false", "profiles.work.notifications", "known"),
            ('[profiles."-bad"]', "profiles.-bad", "profile"),
            ('[profiles."a b"]', "profiles.a b", "profile"),
            ("refresh_fractoin = 0.5", "refresh_fractoin", "did you mean 'refresh_fraction'"),
            ("[other]\nx = 1", "other", "known keys: refresh_fraction"),
        ],
    )
    def test_bad_value_names_key_file_and_rule(
        self, tmp_path: Path, text: str, key: str, allowed: str
    ) -> None:
        """A bad key or value is one ConfigError line naming the dotted key and the rule."""
        message = error_of(tmp_path, text + "\n")
        assert f"key {key!r} " in message
        assert allowed in message

    def test_message_reads_as_documented(self, tmp_path: Path) -> None:
        """The message has exactly the documented shape."""
        message = error_of(tmp_path, "[profiles.work]\nrefresh_fraction = 2\n")
        assert message == (
            f"config error in {tmp_path / CONFIG_FILENAME}: key "
            "'profiles.work.refresh_fraction' must be a number from 0.1 to 0.95 (got 2)"
        )

    def test_cap_below_first_blames_the_key_that_was_set(self, tmp_path: Path) -> None:
        """backoff_cap_seconds below backoff_first_seconds names the key its table set."""
        message = error_of(tmp_path, "backoff_first_seconds = 30\nbackoff_cap_seconds = 10\n")
        assert "key 'backoff_cap_seconds' must be at least backoff_first_seconds (30)" in message
        text = "backoff_cap_seconds = 10\n[profiles.a]\nbackoff_first_seconds = 20\n"
        message = error_of(tmp_path, text)
        assert "key 'profiles.a.backoff_first_seconds' must be at most" in message

    def test_long_values_are_not_quoted(self, tmp_path: Path) -> None:
        """A long string in the wrong place (maybe a pasted token) is described, not quoted."""
        secret = "rt-" + "s3cr3t" * 20
        message = error_of(tmp_path, f'refresh_fraction = "{secret}"\n')
        assert "s3cr3t" not in message
        assert "a string of 123 characters" in message

    def test_long_keys_are_shortened(self, tmp_path: Path) -> None:
        """An absurdly long key is cut in the message, which stays one short line."""
        message = error_of(tmp_path, f"{'k' * 5000} = 1\n")
        assert len(message) < 600


class TestUnreadableFiles:
    def test_syntax_error_names_line_and_column(self, tmp_path: Path) -> None:
        """Invalid TOML is reported with tomllib's line and column."""
        message = error_of(tmp_path, "refresh_fraction = 0.5\nlog_level = \n")
        assert "not valid TOML" in message
        assert "line 2, column" in message

    def test_duplicate_key_is_a_syntax_error(self, tmp_path: Path) -> None:
        """A key given twice is invalid TOML, not silently the last value."""
        message = error_of(tmp_path, "refresh_fraction = 0.5\nrefresh_fraction = 0.6\n")
        assert "line 2" in message

    def test_deep_nesting_is_a_config_error(self, tmp_path: Path) -> None:
        """Nesting deep enough to exhaust tomllib's recursion is a ConfigError."""
        message = error_of(tmp_path, "x = " + "[" * 5000 + "]" * 5000 + "\n")
        assert "nested too deeply" in message

    def test_huge_integer_is_a_config_error(self, tmp_path: Path) -> None:
        """An integer past Python's digit limit (a plain ValueError in tomllib) is a ConfigError."""
        message = error_of(tmp_path, "refresh_fraction = " + "1" * 5000 + "\n")
        assert "not valid TOML: a number has too many digits" in message
        assert "set_int_max_str_digits" not in message

    def test_not_utf8(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 is a ConfigError naming the file."""
        path = write(tmp_path, b'log_level = "\xff"\n')
        with pytest.raises(ConfigError, match=f"config error in {path}: not UTF-8"):
            load_config(tmp_path)

    def test_huge_file(self, tmp_path: Path) -> None:
        """A file over the size limit is refused before parsing."""
        path = write(tmp_path, "#" * (MAX_CONFIG_BYTES + 1))
        with pytest.raises(ConfigError, match=f"config error in {path}: the file is larger"):
            load_config(tmp_path)

    def test_directory_in_place_of_file(self, tmp_path: Path) -> None:
        """A config.toml that cannot be read as a file is a ConfigError naming it."""
        (tmp_path / CONFIG_FILENAME).mkdir()
        with pytest.raises(ConfigError, match="cannot read the file") as info:
            load_config(tmp_path)
        assert str(tmp_path / CONFIG_FILENAME) in str(info.value)

    def test_fifo_in_place_of_file(self, tmp_path: Path) -> None:
        """A FIFO named config.toml is refused at once instead of blocking the reader."""
        os.mkfifo(tmp_path / CONFIG_FILENAME)
        with pytest.raises(ConfigError, match="not a regular file"):
            load_config(tmp_path)

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
    def test_permission_denied(self, tmp_path: Path) -> None:
        """A config.toml without read permission is a ConfigError naming it."""
        path = write(tmp_path, "")
        path.chmod(0)
        with pytest.raises(ConfigError, match="Permission denied"):
            load_config(tmp_path)


# ---- fuzzing: documents we serialise ourselves, and raw text ----

_KEYS = st.sampled_from(
    [
        *POLICY_RANGES,
        *("on_alert", "alert_timeout_seconds", "notifications", "log_format", "log_level"),
        *("profiles", "work", "-bad", "a b", "", "x.y", "\n"),
    ]
) | st.text(max_size=8)

_SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(min_value=0, max_value=400)
    | st.text(max_size=12)
    | st.sampled_from(["auto", "json", "debug", "sh -c 'x", "/bin/true"])
)

_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)


def toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes, but astral characters literal (no surrogates)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    """A value in TOML syntax (inline tables for dicts); whatever it is, we write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(doc: dict[str, Any]) -> str:
    """Scalars and arrays first, then each table as a [section]."""
    lines = [
        f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)
    ]
    for key, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_string(key)}]")
            lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def load_or_config_error(text: str) -> None:
    try:
        parse_config(text, "/x/config.toml")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("config error in /x/config.toml: ")
        assert "\n" not in message


class TestFuzzing:
    @settings(max_examples=500, deadline=None)
    @given(st.dictionaries(_KEYS, _VALUES, max_size=6))
    def test_documents_load_or_raise_config_error(self, doc: dict[str, Any]) -> None:
        """Any document of keys and values loads or raises a one-line ConfigError."""
        load_or_config_error(toml_document(doc))

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from(sorted(POLICY_RANGES)),
            st.floats(min_value=0, max_value=400) | st.integers(0, 400),
        ),
        st.dictionaries(
            st.sampled_from(["work", "lab", "x"]),
            st.dictionaries(
                st.sampled_from(sorted(POLICY_RANGES)), st.floats(min_value=0, max_value=400)
            ),
        ),
    )
    def test_policy_documents_load_or_raise(
        self, top: dict[str, Any], profiles: dict[str, Any]
    ) -> None:
        """Plausible policy documents (often valid) load or raise only ConfigError."""
        load_or_config_error(toml_document({**top, "profiles": profiles}))

    @settings(max_examples=500, deadline=None)
    @given(
        st.text(alphabet=st.sampled_from(list("[]{}=\"'.,#\n \t\\0123456789aefnrtsu_-+:")))
        | st.text()
    )
    def test_random_text_loads_or_raises_config_error(self, text: str) -> None:
        """Arbitrary text loads or raises a one-line ConfigError, never anything else."""
        load_or_config_error(text)

    def test_valid_policy_documents_do_load(self) -> None:
        """The serialiser writes TOML that tomllib reads back (the fuzzing is not vacuous)."""
        doc = {"refresh_fraction": 0.5, "profiles": {"work": {"refresh_lifetime_days": 1.5}}}
        config = parse_config(toml_document(doc))
        assert config.policy_for("work").refresh_lifetime_days == 1.5

"""The scripting contract: tokens out of argv, `status --check`, `--json`, AAC_TOKEND_PROFILE.

The README's own shell lines run for real: the console script, a real daemon, the loopback
sandbox's API and the system's curl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aac_tokend.cli import fast_token_args
from aac_tokend.client import format_token
from aac_tokend.commands.main import build_parser, default_profile
from aac_tokend.core.report import (
    CHECK_EXIT,
    REPORT_FIELDS,
    StatusRow,
    check_rows,
    profile_report,
    report_row,
    verdict,
)
from aac_tokend.core.state import Rejection, RejectionReason
from aac_tokend.testing import oauth_state
from tests.helpers_e2e import (
    CONSOLE_SCRIPT,
    WORKSPACE_PATH,
    E2EHome,
    RecordingSandbox,
    assert_one_line_error,
    import_pair,
    wait_until,
)

README = Path(__file__).resolve().parent.parent / "README.md"
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/sysdeps)")

# -- what counts as a token in argv ---------------------------------------------------------

#: A command substitution of `aac-tokend token`, $(...) or backquotes.
_TOKEN_SUBSTITUTION = re.compile(r"\$\(\s*aac-tokend\s+token\b|`\s*aac-tokend\s+token\b")
#: ... which is harmless only as the whole right side of a shell variable assignment.
_ASSIGNMENT = re.compile(
    r"\s*(?:export\s+|local\s+)?[A-Za-z_]\w*=\$\(aac-tokend token[^()`]*\)\s*(?:\|\|.*)?(?:#.*)?"
)
#: A token expanded into an argument: "Bearer $T", "Bearer ${T}", "Bearer $(...)", curl's
#: --oauth2-bearer "$T".
_EXPANDED_TOKEN = re.compile(r"Bearer\s+\$|--oauth2-bearer[\s=]+\S*\$")


def token_in_argv(line: str) -> bool:
    """True if this shell line would put an access token in some process's argv."""
    if _EXPANDED_TOKEN.search(line):
        return True
    return bool(_TOKEN_SUBSTITUTION.search(line)) and not _ASSIGNMENT.fullmatch(line)


def readme_code() -> list[str]:
    """Every line of every fenced block, and every inline code span, of the README."""
    lines, fenced = [], False
    for line in README.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            lines.append(line)
        else:
            lines += re.findall(r"`([^`]+)`", line)
    return lines


def readme_block(containing: str) -> str:
    """The one fenced block of the README that contains ``containing``."""
    blocks = re.findall(r"^\s*```[^\n]*\n(.*?)^\s*```", README.read_text(), re.S | re.M)
    (block,) = [b for b in blocks if containing in b]
    return str(block)


class TestReadmeKeepsTokensOutOfArgv:
    """No command the README teaches passes a token on a command line."""

    @pytest.mark.parametrize(
        "line",
        [
            'curl -H "Authorization: Bearer $(aac-tokend token)" https://x',
            'curl -H "Authorization: Bearer `aac-tokend token -p work`" https://x',
            'curl -H "Authorization: Bearer $TOKEN" https://x',
            'curl --oauth2-bearer "$(aac-tokend token)" https://x',
            "http https://x Authorization:$(aac-tokend token --header)",
            "aac-tokend exec -- sh -c 'curl -H \"Authorization: Bearer $AAC_ACCESS_TOKEN\" x'",
        ],
    )
    def test_the_detector_flags_a_token_in_argv(self, line: str) -> None:
        """Each way of putting the token on a command line is caught."""
        assert token_in_argv(line)

    @pytest.mark.parametrize(
        "line",
        [
            "aac-tokend token --header | curl -fsS -H @- https://x",
            "header=$(aac-tokend token --header) || exit",
            "export T=$(aac-tokend token -p work)",
            "aac-tokend token --curl-config | curl -K - https://x",
        ],
    )
    def test_the_detector_passes_stdin_and_assignments(self, line: str) -> None:
        """Pipes and plain variable assignments are not argv."""
        assert not token_in_argv(line)

    def test_no_readme_code_puts_a_token_in_argv(self) -> None:
        """Every code block and inline code span of the README keeps tokens out of argv."""
        code = readme_code()
        assert len(code) > 200, "the README's code was not found"
        assert [line for line in code if token_in_argv(line)] == []

    def test_the_first_use_example_pipes_the_header(self) -> None:
        """The first token use the README shows is `token --header | curl -H @-`."""
        text = README.read_text()
        first = text.index("aac-tokend token")
        assert text[first:].startswith("aac-tokend token --header | curl -fsS -H @- ")


def _api(sandbox: RecordingSandbox) -> str:
    return sandbox.api_url + WORKSPACE_PATH


def _sh(home: E2EHome, script: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a README shell snippet with the installed `aac-tokend` first on PATH."""
    path = f"{Path(CONSOLE_SCRIPT).parent}:{home.env.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run(
        ["sh", "-c", script], env={**home.env, "PATH": path, **env},
        capture_output=True, text=True, timeout=60, cwd=home.root, check=False,
    )  # fmt: skip


@needs_curl
class TestTokenToCurlOnStdin:
    """`token --header` and `--curl-config` feed real curl, which calls the sandbox's API."""

    def test_readme_curl_lines_reach_the_api(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Both README forms (`-H @-`, `-K -`) get a 200 from the API through a real daemon."""
        sandbox = sandboxes()
        import_pair(home, sandbox)
        home.daemon().start(profiles=["default"])
        block = readme_block("token --curl-config | curl")
        lines = [line.split("  #")[0] for line in block.splitlines() if "curl" in line]
        assert len(lines) == 2 and "-H @-" in lines[0] and "-K -" in lines[1]
        for line in lines:
            result = _sh(home, line, URL=_api(sandbox))
            assert result.returncode == 0, (line, result.stderr)
            assert json.loads(result.stdout)["name"] == "Sandbox workspace"

    def test_readme_script_stops_before_curl_when_there_is_no_token(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """The `|| exit` script calls the API with a token; without one it exits, saying why."""
        sandbox = sandboxes()
        script = readme_block("|| exit")
        missing = _sh(home, script, URL=_api(sandbox))
        assert missing.returncode == 65, missing  # aac-tokend's status; curl -f would say 22
        assert missing.stdout == "" and "aac-tokend: error:" in missing.stderr

        import_pair(home, sandbox)
        home.daemon().start(profiles=["default"])
        ok = _sh(home, script, URL=_api(sandbox))
        assert ok.returncode == 0, ok
        assert json.loads(ok.stdout)["name"] == "Sandbox workspace"

    def test_offline_token_prints_the_same_forms(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Without a daemon (the long path), `--header` and `--curl-config` print the same lines."""
        sandbox = sandboxes()
        pair = import_pair(home, sandbox)
        token = str(pair["access_token"])
        header = home.cli("token", "--header")
        assert header.stdout == f"Authorization: Bearer {token}\n", str(header)
        config = home.cli("token", "--curl-config", "-p", "default")
        assert config.stdout == f'header = "Authorization: Bearer {token}"\n', str(config)
        assert home.cli("token", "--header", "--curl-config").returncode == 2


def _curl_config_value(line: str) -> str:
    """What curl reads from one `header = "..."` config line (its quoted-string rules)."""
    match = re.fullmatch(r'header = "((?:[^"\\]|\\.)*)"\n', line)
    assert match, line
    return re.sub(r"\\(.)", r"\1", match.group(1))


class TestTokenForms:
    """The printed forms carry the token exactly, whatever its characters."""

    @given(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1))
    def test_curl_config_round_trips(self, token: str) -> None:
        """A curl config line reads back as the exact header, quotes and backslashes included."""
        line = format_token(token, "curl-config")
        assert _curl_config_value(line) == f"Authorization: Bearer {token}"

    @given(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1))
    def test_header_and_plain_are_one_line(self, token: str) -> None:
        """`--header` is the header and a newline; plain is the token and a newline."""
        assert format_token(token, "header") == f"Authorization: Bearer {token}\n"
        assert format_token(token) == token + "\n"


#: Words a `token` command line may be made of, the tricky ones included.
_TOKEN_WORDS = st.sampled_from([
    "--header", "--curl-config", "-p", "--profile", "--profile=work", "--profile=", "work",
    "default", "a.b-c_1", "-x", "--json", "-pwork", ".hidden", "a/b", "--head", "--", "-h",
    "--header=1", "--profile=--header", "é",
]) | st.text(max_size=6)  # fmt: skip


class TestFastPathReadsArgvLikeArgparse:
    """The `token` fast path never reads a command line differently from the parser."""

    @given(st.lists(_TOKEN_WORDS, max_size=5))
    def test_fast_args_agree_with_argparse(self, args: list[str]) -> None:
        """Whatever the fast path accepts, argparse accepts with the same profile and form."""
        fast = fast_token_args(args, default_profile())
        if fast is None:
            return  # the long way: argparse itself decides
        with contextlib.redirect_stderr(io.StringIO()):
            parsed = build_parser().parse_args(["token", *args])
        assert (parsed.profile or default_profile(), parsed.form) == fast  # None: not given

    def test_it_takes_the_common_forms(self) -> None:
        """Plain, -p, --profile=, --header and --curl-config stay on the fast path."""
        assert fast_token_args([], "default") == ("default", "plain")
        assert fast_token_args(["-p", "work", "--header"], "x") == ("work", "header")
        assert fast_token_args(["--curl-config", "--profile=w"], "x") == ("w", "curl-config")
        assert fast_token_args(["--profile", "--header"], "x") is None
        # "-p" takes no "-..." word as its value in argparse, even when a later option names one
        assert fast_token_args(["-p", "--header", "--profile=work"], "x") is None


# -- status --check ----------------------------------------------------------------------


def _row(name: str = "default", state: str = "ok", **fields: Any) -> StatusRow:
    return report_row(**{"profile": name, "state": state, "token_valid": True, **fields})


class TestCheckRows:
    """The exit status of `status --check`, from the rows `status --json` prints."""

    def test_all_fine(self) -> None:
        """Every profile with a valid token and no alert, daemon running: 0, nothing said."""
        assert check_rows([_row(), _row("work", "retrying")], daemon_running=True) == (0, [])

    @pytest.mark.parametrize(
        "row",
        [
            _row(state="rejected", alert="generate a new token"),
            _row(state="expired", token_valid=False),
            _row(state="corrupt", token_valid=False),
            _row(alert="the refresh token expires in 6 days"),
            _row(state="unreadable", token_valid=False),
            _row(state="misnamed", token_valid=False),
        ],
    )
    def test_needs_a_person(self, row: StatusRow) -> None:
        """Rejected, expired, corrupt or any alert: 69, naming the profile, daemon or not."""
        for running in (True, False):
            status, lines = check_rows([_row("work"), row], daemon_running=running)
            # the daemon's own line too when it is not running (tests/test_cli_contract.py)
            assert status == 69 and len(lines) == 2 - running and lines[0].startswith("default: ")

    def test_no_profiles_needs_a_person(self) -> None:
        """No profile at all is not "all fine": 69, saying to import one."""
        status, lines = check_rows([], daemon_running=True)
        assert status == 69 and "aac-tokend import" in lines[0]

    def test_no_daemon(self) -> None:
        """Valid stored tokens but nothing refreshing them: 4."""
        assert check_rows([_row()], daemon_running=False)[0] == 4

    def test_retrying_without_a_token_is_temporary(self) -> None:
        """No valid token yet while the daemon retries: 75."""
        row = _row(state="retrying", token_valid=False)
        assert check_rows([_row("a"), row], daemon_running=True)[0] == 75


class TestReportRow:
    """Every status row has every README field, whatever the daemon knows of the profile."""

    @pytest.mark.parametrize("state", ["corrupt", "unreadable", "misnamed", "retrying"])
    def test_a_row_without_a_state_has_every_field(self, state: str) -> None:
        """A row built from a name alone has all fields: no valid token, the rest null."""
        row = report_row(profile="work", state=state, alert="fix it").to_wire()
        assert list(row) == list(REPORT_FIELDS)
        assert row["token_valid"] is False and row["kind"] is None and row["rejection"] is None

    @pytest.mark.parametrize("rejected", [False, True])
    def test_the_wire_form_reads_back_as_the_row(self, rejected: bool) -> None:
        """A row sent as JSON (to_wire) reads back equal (from_wire), every field in order."""
        state = oauth_state(profile="work")
        if rejected:
            why = Rejection(RejectionReason.REUSE_SUSPECTED, "invalid_grant", None, 1.0)
            state = dataclasses.replace(state, rejection=why)
        row = profile_report(state, 1_800_000_000.0, next_refresh=None, token_socket="/s")
        wire = json.loads(json.dumps(row.to_wire()))
        assert list(wire) == list(REPORT_FIELDS) and StatusRow.from_wire(wire) == row
        assert wire["state"] == row.state.value and wire["kind"] == "oauth"

    def test_a_field_outside_the_schema_is_refused(self) -> None:
        """A misspelt field fails at once rather than reaching a script's JSON."""
        with pytest.raises(ValueError, match="not status fields"):
            report_row(profile="work", stat="ok")

    def test_readme_names_every_field_and_state(self) -> None:
        """The README's `status` row names each field and each state a row can carry."""
        rows = README.read_text().splitlines()
        line = next(x for x in rows if x.startswith("| `aac-tokend status"))
        named = set(re.findall(r"`([a-z_]+)`", line))
        states = {"ok", "retrying", "rejected", "expired", "corrupt", "unreadable", "misnamed"}
        assert set(REPORT_FIELDS) - named == set() and states - named == set()

    @pytest.mark.parametrize(
        ("row", "expected"),
        [
            (_row(), "ok"),
            (_row(state="retrying", token_valid=False), "wait"),
            (_row(state="retrying", token_valid=False, alert="disk full"), "needs_person"),
            (_row(state="expired", token_valid=False), "needs_person"),
        ],
    )
    def test_verdict_is_the_check_rule(self, row: StatusRow, expected: str) -> None:
        """The one rule behind `status --check` and `token`'s exit status."""
        assert verdict(row) == expected

    @given(
        state=st.sampled_from(["ok", "retrying", "rejected", "expired", "corrupt", "unreadable",
                               "misnamed"]),
        token_valid=st.booleans(),
        alert=st.one_of(st.none(), st.just(""), st.text(min_size=1, max_size=20)),
    )  # fmt: skip
    def test_check_of_one_row_is_its_verdict(
        self, state: str, token_valid: bool, alert: str | None
    ) -> None:
        """For any one row, `status --check` exits with that row's verdict: no second rule."""
        row = report_row(profile="p", state=state, token_valid=token_valid, alert=alert)
        assert check_rows([row], daemon_running=True)[0] == CHECK_EXIT[verdict(row)]


class TestTokenExitFollowsCheck:
    """`token` and `refresh` exit like `status --check` for the same profile at that moment."""

    def test_an_outage_is_temporary_for_every_command(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Endpoint down and the access token run out: 75 from check, token and refresh."""
        sandbox = sandboxes(access_ttl=3)
        home.paths.config_dir.mkdir(parents=True, exist_ok=True)
        (home.paths.config_dir / "config.toml").write_text(
            "backoff_first_seconds = 0.5\nbackoff_cap_seconds = 2\n"
        )
        import_pair(home, sandbox)
        sandbox.fail_next(10_000, status=503)
        daemon = home.daemon().start()  # it never gets a token to serve
        wait_until(
            lambda: not daemon.profile_status()["token_valid"], 30.0, "the access token to run out"
        )
        check = home.cli("status", "--check")
        assert check.returncode == 75, str(check)
        for form in ([], ["--header"], ["--curl-config"]):
            token = home.cli("token", *form)
            assert "HTTP 503" in assert_one_line_error(token, 75)  # why, as status says
        refresh = home.cli("refresh")
        assert refresh.returncode == 75, str(refresh)
        assert "valid until" not in refresh.stdout and "no valid token" in refresh.stdout

    def test_a_failed_refresh_with_a_valid_token_is_fine_for_both(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """One 503 while the token is still valid: `refresh` exits 0, as `status --check` does."""
        sandbox = sandboxes(access_ttl=600)
        import_pair(home, sandbox)
        home.daemon().start(profiles=["default"])
        sandbox.fail_next(1, status=503)
        refresh = home.cli("refresh", "--json")
        row = json.loads(refresh.stdout)
        assert row["state"] == "retrying" and row["token_valid"] is True, row
        check = home.cli("status", "--check")
        assert check.returncode == 0, str(check)
        assert refresh.returncode == check.returncode, str(refresh)


def _replay(sandbox: RecordingSandbox, refresh_token: str) -> int:
    """A third party presents a refresh token at the sandbox; the HTTP status."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
            "client_id": sandbox.client_id}  # fmt: skip
    request = urllib.request.Request(
        sandbox.token_endpoint, urllib.parse.urlencode(form).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


class TestStatusCheck:
    """`status --check` against a real daemon: 0 while fine, 69 once a chain is rejected."""

    def test_fine_then_rejected(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """0 with a healthy chain; 69 and a stderr line after a replay; 69 offline too."""
        sandbox = sandboxes()
        original = import_pair(home, sandbox)
        assert home.cli("status", "--check").returncode == 4  # stored, valid, nobody refreshing
        daemon = home.daemon().start(profiles=["default"])
        fine = home.cli("status", "--check")
        assert fine.returncode == 0 and fine.stderr == "", str(fine)
        assert fine.stdout == home.cli("status").stdout

        assert home.cli("refresh").returncode == 0
        assert _replay(sandbox, str(original["refresh_token"])) == 400  # the family is revoked
        assert home.cli("refresh").returncode == 69
        rejected = home.cli("status", "--check", "--json")
        assert rejected.returncode == 69, str(rejected)
        assert json.loads(rejected.stdout)["profiles"][0]["state"] == "rejected"
        assert rejected.stderr.startswith("aac-tokend: check: default: rejected: ")
        assert len(rejected.stderr_lines()) == 1

        daemon.stop()
        assert home.cli("status", "--check").returncode == 69

    def test_plain_status_still_exits_zero(self, home: E2EHome) -> None:
        """Without --check, `status` exits 0 as before, even with nothing to show."""
        assert home.cli("status").returncode == 0
        assert home.cli("status", "--check").returncode == 69


class TestJsonAndProfileVariable:
    """`--json` on what scripts read, and AAC_TOKEND_PROFILE as the default profile."""

    def test_profiles_and_refresh_json(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """`profiles --json` lists names with and without the daemon; `refresh --json` a row."""
        sandbox = sandboxes()
        for name in ("work", "default"):
            import_pair(home, sandbox, profile=name)
        offline = json.loads(home.cli("profiles", "--json").stdout)
        assert offline == {"daemon_running": False, "profiles": ["default", "work"]}
        home.daemon().start(profiles=["default", "work"])
        online = json.loads(home.cli("profiles", "--json").stdout)
        assert online == {"daemon_running": True, "profiles": ["default", "work"]}
        result = home.cli("refresh", "-p", "work", "--json")
        assert result.returncode == 0, str(result)
        row = json.loads(result.stdout)
        assert row["profile"] == "work" and row["state"] == "ok" and row["refresh_count"] == 1

    def test_profile_variable_is_the_default(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """AAC_TOKEND_PROFILE picks the profile on the fast and long paths; --profile wins."""
        sandbox = sandboxes()
        work = str(import_pair(home, sandbox, profile="work")["access_token"])
        default = str(import_pair(home, sandbox)["access_token"])
        env = dict(home.env, AAC_TOKEND_PROFILE="work")
        assert home.cli("token", env=env).stdout == work + "\n"  # offline: the long path
        daemon = home.daemon().start(profiles=["default", "work"])
        for console_script in (False, True):
            fast = home.cli("token", "--header", env=env, console_script=console_script)
            assert fast.stdout == f"Authorization: Bearer {work}\n", str(fast)
        assert home.cli("token", "-p", "default", env=env).stdout == default + "\n"
        assert home.cli("refresh", "--json", env=env).stdout.count('"profile": "work"') == 1
        shown = home.cli("exec", "--", "sh", "-c", 'test "$AAC_ACCESS_TOKEN" = "$T"',
                         env=dict(env, T=daemon.token("work")))  # fmt: skip
        assert shown.returncode == 0, str(shown)

    def test_exec_hands_its_profile_to_the_job(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """`exec -p work`: a snapshot token, and `token`/get_token() in the job read work afresh."""
        sandbox = sandboxes()
        for name in ("work", "default"):
            import_pair(home, sandbox, profile=name)
        daemon = home.daemon().start(profiles=["default", "work"])
        job = (
            'test "$(aac-tokend token)" = "$AAC_ACCESS_TOKEN" || exit 11\n'
            "aac-tokend refresh >/dev/null || exit 12\n"
            'test "$(aac-tokend token)" != "$AAC_ACCESS_TOKEN" || exit 13\n'
            '"$PY" -c "from aac_tokend import get_token; print(get_token())"\n'
        )
        path = f"{Path(CONSOLE_SCRIPT).parent}:{home.env['PATH']}"
        env = dict(home.env, PATH=path, PY=sys.executable)
        result = home.cli("exec", "-p", "work", "--", "sh", "-c", job, env=env)
        assert result.returncode == 0, str(result)
        assert result.stdout == daemon.token("work") + "\n"
        assert daemon.profile_status("work")["refresh_count"] == 1
        assert daemon.profile_status("default")["refresh_count"] == 0

    @pytest.mark.parametrize("value", ["../etc", "-x", "a b", "x" * 65])
    def test_a_bad_profile_variable_is_named(self, home: E2EHome, value: str) -> None:
        """A bad AAC_TOKEND_PROFILE: exit 65, one line naming the variable and what to do."""
        env = dict(home.env, AAC_TOKEND_PROFILE=value)
        for command in (["token"], ["token", "--header"], ["refresh"]):
            message = assert_one_line_error(home.cli(*command, env=env), 65)
            assert "AAC_TOKEND_PROFILE" in message and "unset" in message

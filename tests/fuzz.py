"""Fuzz the parsers of untrusted input: ``python -m tests.fuzz --seconds N [--target NAME]``.

With atheris importable each target runs coverage-guided in its own child process (libFuzzer
ends the process when its time is up or at the first crash); otherwise hypothesis draws
random inputs for the same time. The only exceptions a target may raise are the
``aac_tokend.errors`` tree; anything else is a finding: it is printed and the exit status is 1.
Prints, per target, the cases run and the findings.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

try:
    import atheris  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # not installable here: fall back to hypothesis
    atheris = None

if atheris is not None and "--child" in sys.argv:
    # only the fuzzing child pays for instrumenting, and only our own package
    with atheris.instrument_imports(include=["aac_tokend"]):
        from aac_tokend.core import config, importer, tokens
        from aac_tokend.errors import AacTokendError
        from aac_tokend.refresh import endpoint
        from aac_tokend.serve import control_server, wire
else:
    from aac_tokend.core import config, importer, tokens
    from aac_tokend.errors import AacTokendError
    from aac_tokend.refresh import endpoint
    from aac_tokend.serve import control_server, wire

__all__ = ["TARGETS", "main"]

NOW = 1_800_000_000.0  # a fixed "now": the parsers are pure in it


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def fuzz_parse_jwt(data: bytes) -> None:
    """parse_jwt on raw text, or (first byte odd) on a JWT whose payload is the input."""
    if data[:1] and data[0] & 1:
        head = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=")
        body = base64.urlsafe_b64encode(data[1:]).rstrip(b"=")
        tokens.parse_jwt((head + b"." + body + b".c2ln").decode())
    else:
        tokens.parse_jwt(_text(data))


def fuzz_classify_response(data: bytes) -> None:
    """classify_response with the status from 2 bytes, headers, a blank line, then the body."""
    status = int.from_bytes(data[:2], "big") % 600
    head, _, body = data[2:].partition(b"\n\n")
    headers = {}
    for line in _text(head).splitlines():
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    endpoint.classify_response(status, headers, body, NOW)


def fuzz_import(data: bytes) -> None:
    """parse_import_text then build_state, with and without an explicit endpoint."""
    request = importer.parse_import_text(_text(data), profile="fuzz", legacy=data[:1] == b"L")
    for req in (request, replace(request, token_endpoint="http://127.0.0.1:1/as/token")):
        with contextlib.suppress(AacTokendError):
            importer.build_state(req, NOW)


def fuzz_parse_config(data: bytes) -> None:
    """parse_config on the input as TOML text."""
    config.parse_config(_text(data))


def fuzz_control_line(data: bytes) -> None:
    """The control server's line parser, its error answer (built on the I/O thread), and
    ImportRequest.from_wire for an import."""
    request, echo, problem = wire.parse_request(data)
    if problem is not None:
        wire.failure("bad_request", problem, echo)
        return
    assert request is not None
    if request.get("op") == "import":
        importer.ImportRequest.from_wire(dict(request))


class _AnswerHandler:
    """A handler whose result is hostile too: it echoes the request, returns whatever JSON
    ``tail`` parses to (NaN, lone surrogates, 900 levels deep: nothing validates it), or
    raises, as ``mode`` picks."""

    def __init__(self, mode: int, tail: bytes) -> None:
        self.mode = mode
        self.tail = tail

    def handle(self, request: dict[str, object]) -> dict[str, object]:
        if self.mode == 0:
            return {"ok": True, "got": request}
        if self.mode == 1:
            raise AacTokendError(f"refused {request!r}"[:200])
        if self.mode == 2:
            raise RuntimeError("a bug")
        try:
            value: object = json.loads(self.tail)
        except (ValueError, RecursionError):
            value = self.tail.decode("utf-8", "surrogateescape")
        if self.mode == 3:
            return {"ok": True, "value": value}
        return value  # type: ignore[return-value]  # not even a dict, perhaps


def _refuse_constant(name: str) -> object:
    raise AssertionError(f"the answer holds {name}, which is not JSON")


def fuzz_control_answer(data: bytes) -> None:
    """The whole answer path of the control server for one request line: parse_request, then the
    error answer or _respond with a hostile handler. Input: a mode byte, the request line, a
    newline, the handler's raw answer. The answer must be one strict-JSON object with a
    boolean ok, echo the id exactly when it was accepted, and stay bounded."""
    mode, rest = (data[0] % 5, data[1:]) if data else (0, b"")
    line, _, tail = rest.partition(b"\n")
    request, echo, problem = wire.parse_request(line)
    if problem is not None or request is None:
        answer = wire.failure("bad_request", problem or "bad request", echo)
    else:
        answer = control_server._respond(_AnswerHandler(mode, tail), request, echo)
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1, answer[:200]
    parsed = json.loads(answer, parse_constant=_refuse_constant)
    assert isinstance(parsed, dict) and isinstance(parsed.get("ok"), bool), answer[:200]
    if echo:
        assert len(echo) <= wire.MAX_ID_BYTES
        assert request is not None and parsed["id"] == request["id"]
    if problem is not None:
        assert parsed["ok"] is False and "id" not in parsed, answer[:200]
    if problem is not None or mode in (1, 2):
        assert len(answer) <= 2 * wire.MAX_ID_BYTES + 400, len(answer)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "parse_jwt": fuzz_parse_jwt,
    "classify_response": fuzz_classify_response,
    "import": fuzz_import,
    "parse_config": fuzz_parse_config,
    "control_line": fuzz_control_line,
    "control_answer": fuzz_control_answer,
}


def _checked(target: Callable[[bytes], None], data: bytes) -> None:
    with contextlib.suppress(AacTokendError):
        target(data)


# -- atheris: one child process per target -----------------------------------------------------


def _atheris_child(name: str, seconds: int) -> None:
    """Runs in the child: libFuzzer prints "Done N runs" and exits (status != 0 on a crash)."""
    target = TARGETS[name]
    artifacts = tempfile.mkdtemp(prefix="atkfuzz", dir="/tmp") + "/"
    argv = [sys.argv[0], f"-max_total_time={seconds}", f"-artifact_prefix={artifacts}"]
    argv.append("-print_final_stats=1")
    atheris.Setup(argv, lambda data: _checked(target, data))
    atheris.Fuzz()


def _run_atheris(name: str, seconds: int) -> tuple[int, int]:
    child = [sys.executable, "-m", "tests.fuzz", "--child", name, "--seconds", str(seconds)]
    proc = subprocess.run(child, capture_output=True, text=True, check=False)
    runs = re.findall(r"Done (\d+) runs|stat::number_of_executed_units:\s*(\d+)", proc.stderr)
    cases = max((int(a or b) for a, b in runs), default=0)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return cases, 1
    return cases, 0


# -- hypothesis fallback ----------------------------------------------------------------------


class _TimeUpError(Exception):
    """Ends the hypothesis run when the target's time is up."""


def _run_hypothesis(name: str, seconds: float) -> tuple[int, int]:
    target = TARGETS[name]
    deadline = time.monotonic() + seconds
    counts = {"cases": 0, "findings": 0}

    @settings(
        max_examples=10**9,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(max_size=4096) | st.text(max_size=2048).map(str.encode))
    def run(data: bytes) -> None:
        if time.monotonic() > deadline:
            raise _TimeUpError
        counts["cases"] += 1
        try:
            _checked(target, data)
        except Exception:
            counts["findings"] += 1
            print(f"finding in {name} for input {data[:200]!r}:", file=sys.stderr)
            traceback.print_exc()

    with contextlib.suppress(_TimeUpError):
        run()
    return counts["cases"], counts["findings"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--seconds", type=int, default=60, help="total time over all targets")
    parser.add_argument("--target", choices=sorted(TARGETS), help="only this target")
    parser.add_argument("--random", action="store_true", help="hypothesis even with atheris")
    parser.add_argument("--child", choices=sorted(TARGETS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _atheris_child(args.child, args.seconds)
        return 0
    names = [args.target] if args.target else list(TARGETS)
    share = max(1, args.seconds // len(names))
    guided = atheris is not None and not args.random
    engine = "atheris (coverage-guided)" if guided else "hypothesis (random)"
    print(f"fuzzing {len(names)} target(s) with {engine}, {share} s each")
    failed = False
    for name in names:
        if guided:
            cases, findings = _run_atheris(name, share)
        else:
            cases, findings = _run_hypothesis(name, share)
        failed |= findings > 0
        print(f"{name:18} cases {cases:>9}  findings {findings}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The HTTP side of the sandbox: the loopback listener, the request handler and its routes.

Requests are read and routed here; what to answer is decided by SandboxServer (sandbox.py),
which this module knows only by type. Its underscore names are shared with sandbox.py only.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import socketserver
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from .server import SandboxServer

__all__ = ["MAX_BODY_BYTES"]

# A token request is well under 1 KiB; anything this big is refused before it is read.
MAX_BODY_BYTES = 64 * 1024
# parse_qs would otherwise build a list for every '&' in the body; a token request has 3.
_MAX_FORM_FIELDS = 64
# A client that stalls mid-request must not hold a handler thread (and its socket) for ever.
_READ_TIMEOUT = 10.0


@dataclass(frozen=True)
class _Injection:
    status: int
    retry_after: float | None
    body: str | None
    drop: bool
    forward: bool = False  # decide as usual (rotate), then answer this failure instead


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer decided before it is sent; ``drop`` closes the connection instead."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False
    delay: float = 0.0


_DROP = _Answer(0, drop=True)


def _json_answer(status: int, obj: object, *headers: tuple[str, str]) -> _Answer:
    base = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))
    return _Answer(status, json.dumps(obj).encode("utf-8"), base + headers)


def _injected_answer(injection: _Injection) -> _Answer:
    headers: tuple[tuple[str, str], ...] = ()
    if (value := injection.retry_after) is not None:
        # Whole seconds per RFC 9110; a fraction is sent as is, to test a client's tolerance.
        headers = (("Retry-After", str(int(value)) if value.is_integer() else repr(value)),)
    if injection.body is None:
        phrase = http.client.responses.get(injection.status, "injected failure")
        return _json_answer(injection.status, {"message": phrase}, *headers)
    try:
        json.loads(injection.body)
        content_type = "application/json"
    except ValueError:
        content_type = "text/plain; charset=utf-8"
    base = (("Content-Type", content_type), ("Cache-Control", "no-store"))
    return _Answer(injection.status, injection.body.encode("utf-8"), base + headers)


def _loopback(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None or not ip.is_loopback:
        raise InputError(f"sandbox host {host!r} is not a loopback address; use 127.0.0.1 or ::1")
    return ip


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler stuck on a client's socket must not keep us alive
    block_on_close = False  # and stop() must not wait for one, e.g. inside its answer delay
    sandbox: SandboxServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) we have no use for.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


# -- HTTP --------------------------------------------------------------------------------


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body) if body.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InputError("the request body must be a JSON object")
    return value


def _field(obj: Mapping[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    value = obj.get(name, default)
    # bool is an int to Python but not to JSON: accept it only where a bool is wanted
    if value is not default and (
        not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    ):
        raise InputError(f"field {name!r} has the wrong type")
    return value


class _Handler(BaseHTTPRequestHandler):
    """Routes one request per connection; every answer is JSON and nothing is printed."""

    server: _HTTPServer
    timeout = _READ_TIMEOUT

    def version_string(self) -> str:
        return "aac-sandbox"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a request line may carry a token, and tests want a clean stderr."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self.close_connection = True  # one request per connection: stop() leaves none open
        sandbox = self.server.sandbox
        path = urllib.parse.urlsplit(self.path).path
        route = _ROUTES.get(path)
        try:
            body = self._body() if method == "POST" else b""
            if route is None:
                answer = _json_answer(404, {"error": "not_found"})
            elif route[0] != method:
                answer = _json_answer(405, {"error": "method_not_allowed"}, ("Allow", route[0]))
            elif isinstance(body, _Answer):
                answer = body
                if path == "/as/token":
                    sandbox._token_request(None)  # logged like every token request
            else:
                answer = route[1](self, sandbox, body)
        except InputError as exc:
            answer = _json_answer(400, {"error": str(exc)})
        except OSError:
            return  # the client went away or stalled; nobody to answer
        if answer.delay > 0 and sandbox._stopping.wait(answer.delay):
            answer = _DROP  # stopping: the answer is lost, as in a crash
        if not answer.drop:
            self._send(answer)

    def _body(self) -> bytes | _Answer:
        if self.headers.get("Transfer-Encoding"):
            return _json_answer(411, {"error": "send a Content-Length"})
        length = self.headers.get("Content-Length", "0").strip()
        if not (length.isascii() and length.isdigit()):
            return _json_answer(400, {"error": "bad Content-Length"})
        if int(length) > MAX_BODY_BYTES:
            return _json_answer(413, {"error": "request body too large"})
        return self.rfile.read(int(length))

    def _send(self, answer: _Answer) -> None:
        try:
            self.send_response(answer.status)
            for name, value in answer.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:
            pass  # the client gave up waiting (a test killing it inside the answer delay)


def _route_token(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    try:
        form = urllib.parse.parse_qs(
            body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS
        )
    except ValueError:
        return sandbox._token_request(None)  # too many fields
    return sandbox._token_request(form)


def _route_workspace(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    return sandbox._workspace(handler.headers.get("Authorization", ""))


def _route_generate(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    obj = _json_object(body)
    client_id = _field(obj, "client_id", (str,), None)
    sub = _field(obj, "sub", (str,), "sandbox-user")
    return _json_answer(200, sandbox.generate(client_id=client_id, sub=sub))


def _route_log(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    return _json_answer(200, sandbox.log())


def _route_revoke(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    sandbox.revoke_access_token(_field(_json_object(body), "access_token", (str,), ""))
    return _json_answer(200, {"revoked": True})


def _route_fail(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    obj = _json_object(body)
    sandbox.fail_next(
        _field(obj, "count", (int,), 1),
        status=_field(obj, "status", (int,), 503),
        retry_after=_field(obj, "retry_after", (int, float), None),
        body=_field(obj, "body", (str,), None),
        drop=_field(obj, "drop", (bool,), False),
        forward=_field(obj, "forward", (bool,), False),
    )
    return _json_answer(200, {"queued": True})


def _route_delay(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    sandbox.set_answer_delay(_field(_json_object(body), "seconds", (int, float), 0.0))
    return _json_answer(200, {"answer_delay": sandbox._answer_delay})


_ROUTES: dict[str, tuple[str, Callable[[_Handler, SandboxServer, bytes], _Answer]]] = {
    "/as/token": ("POST", _route_token),
    "/iam/v1/workspaces/current": ("GET", _route_workspace),
    "/sandbox/generate": ("POST", _route_generate),
    "/sandbox/log": ("GET", _route_log),
    "/sandbox/revoke-access": ("POST", _route_revoke),
    "/sandbox/fail": ("POST", _route_fail),
    "/sandbox/answer-delay": ("POST", _route_delay),
}

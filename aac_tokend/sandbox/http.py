"""The HTTP side of the sandbox: the loopback listener, the request handler and its routes.

Requests are read and routed here; what to answer is decided by SandboxServer (server.py),
through its public methods, and said in the words of answers.py.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import socketserver
import urllib.parse
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .answers import DROP, Answer, json_answer

if TYPE_CHECKING:
    from .server import SandboxServer

__all__ = [
    "MAX_BODY_BYTES",
    "SandboxHTTPServer",
    "SandboxHTTPServer6",
    "SandboxHandler",
    "loopback_address",
]

# A token request is well under 1 KiB; anything this big is refused before it is read.
MAX_BODY_BYTES = 64 * 1024
# parse_qs would otherwise build a list for every '&' in the body; a token request has 3.
_MAX_FORM_FIELDS = 64
# A client that stalls mid-request must not hold a handler thread (and its socket) for ever.
_READ_TIMEOUT = 10.0


def loopback_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None or not ip.is_loopback:
        raise InputError(f"sandbox host {host!r} is not a loopback address; use 127.0.0.1 or ::1")
    return ip


class SandboxHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler stuck on a client's socket must not keep us alive
    block_on_close = False  # and stop() must not wait for one, e.g. inside its answer delay
    sandbox: SandboxServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) we have no use for.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class SandboxHTTPServer6(SandboxHTTPServer):
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


class SandboxHandler(BaseHTTPRequestHandler):
    """Routes one request per connection; every answer is JSON and nothing is printed."""

    server: SandboxHTTPServer
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
                answer = json_answer(404, {"error": "not_found"})
            elif route[0] != method:
                answer = json_answer(405, {"error": "method_not_allowed"}, ("Allow", route[0]))
            elif isinstance(body, Answer):
                answer = body
                if path == "/as/token":
                    sandbox.answer_token_request(None)  # logged like every token request
            else:
                answer = route[1](self, sandbox, body)
        except InputError as exc:
            answer = json_answer(400, {"error": str(exc)})
        except OSError:
            return  # the client went away or stalled; nobody to answer
        if answer.delay > 0 and sandbox.stopped_within(answer.delay):
            answer = DROP  # stopping: the answer is lost, as in a crash
        if not answer.drop:
            self._send(answer)

    def _body(self) -> bytes | Answer:
        if self.headers.get("Transfer-Encoding"):
            return json_answer(411, {"error": "send a Content-Length"})
        length = self.headers.get("Content-Length", "0").strip()
        if not (length.isascii() and length.isdigit()):
            return json_answer(400, {"error": "bad Content-Length"})
        if int(length) > MAX_BODY_BYTES:
            return json_answer(413, {"error": "request body too large"})
        return self.rfile.read(int(length))

    def _send(self, answer: Answer) -> None:
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


def _route_token(handler: SandboxHandler, sandbox: SandboxServer, body: bytes) -> Answer:
    try:
        form = urllib.parse.parse_qs(
            body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS
        )
    except ValueError:
        return sandbox.answer_token_request(None)  # too many fields
    return sandbox.answer_token_request(form)


def _route_workspace(handler: SandboxHandler, sandbox: SandboxServer, body: bytes) -> Answer:
    return sandbox.answer_workspace(handler.headers.get("Authorization", ""))


def _route_generate(handler: SandboxHandler, sandbox: SandboxServer, body: bytes) -> Answer:
    obj = _json_object(body)
    client_id = _field(obj, "client_id", (str,), None)
    sub = _field(obj, "sub", (str,), "sandbox-user")
    return json_answer(200, sandbox.generate(client_id=client_id, sub=sub))


def _route_log(handler: SandboxHandler, sandbox: SandboxServer, body: bytes) -> Answer:
    return json_answer(200, sandbox.log())


def _route_revoke(handler: SandboxHandler, sandbox: SandboxServer, body: bytes) -> Answer:
    sandbox.revoke_access_token(_field(_json_object(body), "access_token", (str,), ""))
    return json_answer(200, {"revoked": True})


def _route_fail(handler: SandboxHandler, sandbox: SandboxServer, body: bytes) -> Answer:
    obj = _json_object(body)
    sandbox.fail_next(
        _field(obj, "count", (int,), 1),
        status=_field(obj, "status", (int,), 503),
        retry_after=_field(obj, "retry_after", (int, float), None),
        body=_field(obj, "body", (str,), None),
        drop=_field(obj, "drop", (bool,), False),
        forward=_field(obj, "forward", (bool,), False),
    )
    return json_answer(200, {"queued": True})


def _route_delay(handler: SandboxHandler, sandbox: SandboxServer, body: bytes) -> Answer:
    sandbox.set_answer_delay(_field(_json_object(body), "seconds", (int, float), 0.0))
    return json_answer(200, {"answer_delay": sandbox.answer_delay})


_ROUTES: dict[str, tuple[str, Callable[[SandboxHandler, SandboxServer, bytes], Answer]]] = {
    "/as/token": ("POST", _route_token),
    "/iam/v1/workspaces/current": ("GET", _route_workspace),
    "/sandbox/generate": ("POST", _route_generate),
    "/sandbox/log": ("GET", _route_log),
    "/sandbox/revoke-access": ("POST", _route_revoke),
    "/sandbox/fail": ("POST", _route_fail),
    "/sandbox/answer-delay": ("POST", _route_delay),
}

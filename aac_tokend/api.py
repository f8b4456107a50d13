"""Using the token from Python and from the shell: ``get_token``, ``TokendAuth``, ``api``.

Both ask the running daemon per request (a token read costs a socket round trip), and on
a 401 ask it for one refresh and retry once: enough to ride out a token revoked or
expired a moment early, never a loop.

The bearer token goes only to the origin (scheme, host, port, as urllib3 reads them) of
the URL it was asked for: a redirect elsewhere carries no token, and the 401 retry adds
one only on that origin, so a redirect to a server that answers 401 cannot harvest it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import string
import sys
import time
from typing import Any
from urllib.parse import urljoin

import requests

from .client import READ_TIMEOUT_SECONDS, need_daemon, read_token
from .core.origin import direct_proxies, url_origin
from .errors import AlertError, EndpointUnavailableError, InputError, ProfileError
from .host.paths import resolve_paths
from .rundir import PROFILE_ENV

__all__ = ["TokendAuth", "add_arguments", "get_token", "request_refresh", "run_cli"]

#: An API call that takes longer than this is not coming back.
API_TIMEOUT_SECONDS = (5.0, 60.0)


#: RFC 7230 "tchar": what a method name may hold (requests raises a bare ValueError otherwise).
_METHOD_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")


def _control(op: str, *, deadline: float = 0.0, **fields: Any) -> dict[str, Any]:
    """The daemon's answer (client.need_daemon: a refusal raises the error its code names)."""
    control = str(resolve_paths(os.environ).control_socket)
    return need_daemon(control, op, deadline=deadline, **fields)


def _profile(profile: str | None) -> str:
    """The profile asked for, else $AAC_TOKEND_PROFILE, else "default" (as the CLI does);
    a name no profile can have is ProfileError (65), never a path to follow."""
    from .core.state import validate_profile_name

    if profile is not None:
        return validate_profile_name(profile)
    value = os.environ.get(PROFILE_ENV)
    if not value:
        return "default"
    try:
        return validate_profile_name(value)
    except ProfileError as exc:
        raise ProfileError(f"{PROFILE_ENV}: {exc}; fix or unset it") from None


def get_token(profile: str | None = None) -> str:
    """The profile's current access token from the running daemon (AlertError if none)."""
    # One budget for both sockets, as `token` has: a hung daemon costs READ_TIMEOUT_SECONDS.
    deadline = time.monotonic() + READ_TIMEOUT_SECONDS
    profile = _profile(profile)
    path = str(resolve_paths(os.environ).token_socket(profile))
    try:
        token = read_token(path, deadline=deadline)
    except OSError:  # not served, busy, cut short: the control socket says why, or has it
        token = ""
    if token:
        return token
    return str(_control("token", deadline=deadline, profile=profile)["token"])


def request_refresh(profile: str | None = None) -> None:
    """Ask the daemon to refresh ``profile`` now and wait for the outcome."""
    _control("refresh", profile=_profile(profile))


class TokendAuth(requests.auth.AuthBase):
    """``requests`` auth: a fresh token per request; on 401, one refresh and one retry."""

    def __init__(self, profile: str | None = None) -> None:
        self.profile = _profile(profile)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        origin = url_origin(request.url or "")
        self._attach(request, origin)
        # The hook goes with the request into every redirect (requests copies hooks), so
        # the origin it binds is the one asked for, not wherever a redirect leads.
        hook = functools.partial(self._on_response, origin)
        request.register_hook("response", hook)  # type: ignore[no-untyped-call]
        return request

    def _attach(
        self, request: requests.PreparedRequest, origin: tuple[str, str, int] | None
    ) -> None:
        """Put the bearer token on ``request`` if it goes to ``origin``, else make sure it
        carries none: the one place the header is set."""
        if origin is None or url_origin(request.url or "") != origin:
            request.headers.pop("Authorization", None)
            return
        request.headers["Authorization"] = f"Bearer {get_token(self.profile)}"

    def _on_response(
        self, origin: tuple[str, str, int] | None, response: requests.Response, **kwargs: Any
    ) -> requests.Response:
        if response.is_redirect:
            self._guard_redirect(origin, response, response.request)
            return response
        if response.status_code != 401 or getattr(response.request, "_tokend_retried", False):
            return response
        retry = response.request.copy()
        if url_origin(retry.url or "") != origin:
            return response  # a 401 from elsewhere is no reason to hand it our token
        request_refresh(self.profile)
        _ = response.content  # drain, so the connection can be reused
        response.close()
        retry._tokend_retried = True  # type: ignore[attr-defined]
        self._attach(retry, origin)
        second: requests.Response = response.connection.send(retry, **kwargs)
        second.history.append(response)
        second.request = retry
        if second.is_redirect:
            # requests builds the next hop from the request it sent first, not from this
            # retry (which it never saw): that one takes the retry's header, the fresh token,
            # and then the same check as any redirect. Without this the next hop carried the
            # old token wherever requests' own, looser check let it (http -> https).
            original = response.request
            original.headers.pop("Authorization", None)
            if "Authorization" in retry.headers:
                original.headers["Authorization"] = retry.headers["Authorization"]
            self._guard_redirect(origin, second, original)
        return second

    @staticmethod
    def _guard_redirect(
        origin: tuple[str, str, int] | None,
        response: requests.Response,
        carrier: requests.PreparedRequest,
    ) -> None:
        """Strip the token from ``carrier``, the request requests copies into the next hop
        (after the hooks run), when the redirect in ``response`` leaves the origin.
        (requests' own check reads the URL with another parser and lets http -> https keep it.)"""
        target = urljoin(response.url, response.headers.get("location", ""))
        if url_origin(target) != origin:
            carrier.headers.pop("Authorization", None)


def _network_words(exc: requests.exceptions.RequestException) -> str:
    """One line for a failed API call, from the kind of failure alone.

    Never ``str(exc)``: requests puts the URLs it tried in it, a proxy URL with its password
    among them (``Failed to parse: http://user:password@...``).
    """
    from .refresh.endpoint import name_network_failure

    named = name_network_failure(exc)
    if named is not None:
        return named
    errors = requests.exceptions
    if isinstance(exc, errors.InvalidProxyURL):
        return "the proxy URL (http_proxy/https_proxy) cannot be parsed; check its host and port"
    if isinstance(exc, errors.InvalidURL | errors.MissingSchema | errors.InvalidSchema):
        return (
            "a URL cannot be parsed: check --base-url, the profile's API base URL and any "
            "proxy in http_proxy/https_proxy"
        )
    if isinstance(exc, errors.Timeout):
        return "the API did not answer in time; try again later"
    if isinstance(exc, errors.ConnectionError):
        return "could not connect to the API; check the network (and any proxy), then try again"
    return f"the request failed ({type(exc).__name__}); try again later"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", help="HTTP method, e.g. GET")
    parser.add_argument("path", help="API path, e.g. /iam/v1/workspaces/current")
    parser.add_argument("--data", help="JSON request body")
    parser.add_argument("--base-url", help="API base URL (default: the profile's)")
    from .commands.main import add_profile_option  # already imported: commands mounts this one

    add_profile_option(parser)


def run_cli(args: argparse.Namespace) -> int:
    """``aac-tokend api METHOD PATH``: print the JSON body; non-2xx exits 1."""
    method = args.method.upper()  # after the check: "ß".upper() is "SS"
    if not args.method or not set(args.method) <= _METHOD_CHARS or len(method) > 32:
        raise InputError(
            f"METHOD {args.method[:40]!r} is not an HTTP method name (letters, digits and "
            "!#$%&'*+-.^_`|~ only); pass e.g. GET or POST"
        )
    body = None
    if args.data is not None:
        try:
            body = json.loads(args.data)
        except ValueError as exc:
            raise InputError("--data is not valid JSON") from exc
    base = args.base_url
    if not base:
        from .core.report import rows_from_wire  # not for get_token's users: deferred

        rows = rows_from_wire(_control("status").get("profiles", []))
        row = next((r for r in rows if r.profile == args.profile), None)
        if row is None:
            raise InputError(f"no profile named {args.profile!r}; import one first")
        base = row.api_base_url
        if not base:
            # An unusable profile (corrupt, unreadable, misnamed) has a row with no URL: its
            # alert is the answer, with the exit status of any other alert.
            alert = row.alert or "the daemon knows no API base URL for it"
            raise AlertError(f"profile {args.profile}: {alert}; or pass --base-url")
    from .core.importer import check_api_base  # import's words for a bad API base URL

    base = check_api_base(base)
    path = args.path if args.path.startswith("/") else "/" + args.path
    try:
        response = requests.request(
            method, base + path, json=body, auth=TokendAuth(args.profile),
            timeout=API_TIMEOUT_SECONDS, proxies=direct_proxies(base),
        )  # fmt: skip
    except requests.exceptions.RequestException as exc:
        raise EndpointUnavailableError(
            f"api: {method[:10]} {path[:80]!r}: {_network_words(exc)}"
        ) from None  # no chain: the error's own text may hold a proxy URL with its password
    try:
        print(json.dumps(response.json(), indent=2))
    except ValueError:
        print(response.text[:10000])
    if not response.ok:
        # quoted: PATH is the caller's, and may hold a newline that would split the line
        print(
            f"aac-tokend: error: HTTP {response.status_code} from {path[:200]!r}", file=sys.stderr
        )
        return 1
    return 0

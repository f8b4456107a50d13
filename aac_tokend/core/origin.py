"""Where a token may be sent: deriving and vetting the token endpoint and API URLs.

Pure functions of their inputs. A refresh token goes only to AAC's own hosts over https,
or where the user said so explicitly (https, or http on loopback); a URL whose host two
parsers could read differently is refused rather than interpreted, and the origin is read
by urllib3, the parser that connects.
"""

from __future__ import annotations

import ipaddress
import string
from urllib.parse import SplitResult, urlsplit

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from ..errors import EndpointNotAllowedError

__all__ = [
    "AAC_DOMAIN",
    "check_endpoint",
    "derive_endpoint",
    "direct_proxies",
    "is_loopback_host",
    "url_origin",
]

#: Hosts under this domain are AAC's own; regional hosts differ, so match the suffix.
AAC_DOMAIN = "alteryxcloud.com"

#: All an endpoint's authority may hold: a DNS name or IP address, a port, brackets for IPv6.
#: Anything else (a backslash, "%", "@", whitespace, control or non-ASCII characters) is
#: where URL parsers disagree about the host, so it is refused rather than interpreted.
_AUTHORITY_CHARS = frozenset(string.ascii_letters + string.digits + ".-:[]")


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_aac_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    return host == AAC_DOMAIN or host.endswith("." + AAC_DOMAIN)


def _is_host_name(host: str) -> bool:
    """True for an IP address or a DNS name of non-empty labels (a trailing dot allowed)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(
        0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
        and label.replace("-", "").isalnum()
        for label in labels
    )  # fmt: skip


def _refuse_odd_port_or_address(authority: str, host: str) -> None:
    """Port 0 or an empty port, and shorthand IPv4 (127.1, 0x7f.1): read differently by
    different parsers and resolvers, so refused with the spelling that works."""
    port = authority.rpartition("]")[2].rpartition(":")
    if port[1] and (not port[2].isdigit() or int(port[2]) == 0):
        raise _refuse("the port must be from 1 to 65535 (or left out with its ':')")
    labels = host.split(".")
    if all(label and label.isascii() and label.isalnum() for label in labels) and (
        labels[-1].isdigit() or labels[-1].lower().startswith("0x")
    ):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise _refuse(
                f"{host[:80]!r} is a shorthand IP address; write it in full (like 127.0.0.1)"
            ) from None


def _refuse(why: str) -> EndpointNotAllowedError:
    return EndpointNotAllowedError(f"token endpoint: {why}")


def url_origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of ``url`` as urllib3 (the parser that connects) reads it,
    with the default port filled in; None when it is not an http(s) URL with a host."""
    try:
        parsed = parse_url(url)
    except (LocationParseError, ValueError):
        return None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("https", "http") or not parsed.host:
        return None
    port = parsed.port or (443 if scheme == "https" else 80)
    return scheme, parsed.host.lower().strip("[]").rstrip("."), port


def _split_agreeing(text: str, origin: tuple[str, str, int] | None) -> SplitResult | None:
    """urlsplit's reading of ``text`` if it names the same host and port as ``origin``.

    Defence in depth: with the characters check_endpoint refuses, the two must agree.
    """
    if origin is None:
        return None
    try:
        split = urlsplit(text)
        port = split.port or origin[2]
    except ValueError:  # a port out of range or not a number
        return None
    if (split.hostname or "").rstrip(".") != origin[1] or port != origin[2]:
        return None
    return split


def check_endpoint(url: str, *, explicit: bool) -> str:
    """Vet a token endpoint URL and return it normalised.

    A derived endpoint must be https under alteryxcloud.com. An explicit one may be any
    https URL, or http on a loopback address (tests, the sandbox). The URL is judged as
    urllib3 reads it (requests connects through urllib3), and refused outright when it
    holds anything two parsers could read differently: backslashes, whitespace or control
    characters anywhere, percent-encoding, userinfo or non-ASCII in the authority.
    """
    text = url.strip()
    if "\\" in text or not text.isprintable() or any(c.isspace() for c in text):
        raise _refuse(
            "the URL holds a backslash, whitespace or a control character; "
            "pass a plain https:// URL"
        )
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("https", "http"):
        raise _refuse("must be an https:// URL with a host; pass --token-endpoint")
    authority = rest
    for stop in "/?#":
        authority = authority.partition(stop)[0]
    if "@" in authority:
        raise _refuse("credentials in the URL are not allowed")
    if not authority or not set(authority) <= _AUTHORITY_CHARS:
        raise _refuse(
            "the host part may hold only letters, digits, dots, hyphens and a port "
            "(no percent-encoding; an international name in its xn-- form)"
        )
    origin = url_origin(text)
    split = _split_agreeing(text, origin)
    if origin is None or split is None:
        raise _refuse("not a valid URL with a host and port; pass --token-endpoint https://...")
    scheme, host, _ = origin
    if not _is_host_name(host):
        raise _refuse(f"{host[:80]!r} is not a host name; pass --token-endpoint https://...")
    _refuse_odd_port_or_address(authority, host)
    if scheme == "http" and not is_loopback_host(host):
        raise _refuse(
            f"plain http to {host} is refused; use https "
            "(http is allowed only on a loopback address)"
        )
    if not explicit and not (scheme == "https" and _is_aac_host(host)):
        raise _refuse(
            f"the token's issuer host {host} is not under {AAC_DOMAIN}; "
            "if you trust it, pass --token-endpoint explicitly"
        )
    query = f"?{split.query}" if split.query else ""
    return f"{scheme}://{authority}{split.path}{query}"


def direct_proxies(url: str) -> dict[str, str] | None:
    """requests' ``proxies`` for a request carrying a token to ``url``.

    None (the environment's proxies) for https. Plain http, which check_endpoint allows only
    on a loopback address, must never go through a proxy: an HTTP_PROXY from the environment
    (``service install`` records it) would carry the token off the machine in cleartext. A
    ``no_proxy`` entry rather than a None per scheme, because requests reads it again for each
    redirect hop, where it would otherwise look the environment's proxies up afresh.
    """
    split = urlsplit(url)
    if split.scheme.lower() != "http":
        return None
    return {"no_proxy": split.hostname or "*"}


def derive_endpoint(issuer: str) -> str:
    """The token endpoint for an issuer: ``iss`` + ``/token``, without doubling either."""
    base = issuer.strip().rstrip("/")
    if base.endswith("/token"):
        return base
    return base + "/token"

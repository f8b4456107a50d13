"""Turning what a user pastes into a profile state: pure, strict, and never echoing a token.

Accepted input: two lines (access token, refresh token), or the JSON object a token endpoint
returns (``access_token``, ``refresh_token``, optional ``expires_in`` and
``refresh_token_expires_in``). A legacy (non-refreshable) token is one line.

Longer than 300 lines: one contract from pasted text to a stored state. The request as it
crosses the control socket, the parsing, and the checks of ``build_state`` share the option
names and limits every refusal quotes; the JWT and URL checks are already in ``tokens`` and
``origin``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from ..errors import InputError, TokenFormatError
from .origin import check_endpoint, derive_endpoint
from .state import ProfileState, TokenKind, validate_profile_name
from .tokens import TokenClaims, json_number, parse_jwt

__all__ = [
    "DEFAULT_API_BASE_URL",
    "ImportRequest",
    "build_state",
    "check_api_base",
    "clean_token",
    "parse_expiry_date",
    "parse_import_text",
]

DEFAULT_API_BASE_URL = "https://api.us1.alteryxcloud.com"
#: Pasted input larger than this is not a token pair.
MAX_INPUT_BYTES = 64 * 1024
MAX_TOKEN_BYTES = 16 * 1024
DAY = 86400.0
#: No lifetime (s), day count or time (epoch s) we accept is near 1e10 (year 2286):
#: a larger one is garbage and would overflow the dates that ``status`` shows.
MAX_NUMBER = 1e10
#: AAC access tokens live minutes to hours; an ``expires_in`` beyond a year is garbage (or a
#: different unit), and trusting it would serve a token long after the server killed it.
MAX_ACCESS_LIFETIME_SECONDS = 366 * DAY
#: A token that dies within a second of its answer is garbage too (or milliseconds).
MIN_ACCESS_LIFETIME_SECONDS = 1.0
#: AAC refresh tokens live 1 to 365 days (User Preferences > OAuth 2.0 API Tokens).
MIN_REFRESH_LIFETIME_DAYS = 1.0
MAX_REFRESH_LIFETIME_DAYS = 365.0
#: What each number is called where a person typed it, so an error names the right thing.
_OPTION = {
    "refresh_lifetime_days": "--refresh-lifetime-days",
    "legacy_expires_at": "--expires",
    "expires_in": "'expires_in' (in the pasted JSON)",
    "refresh_expires_in": "'refresh_token_expires_in' (in the pasted JSON)",
    "refresh_token_expires_in": "'refresh_token_expires_in' (in the pasted JSON)",
}


@dataclass(frozen=True)
class ImportRequest:
    """Everything ``import`` knows; also the body of the control socket's ``import``."""

    profile: str
    access_token: str
    refresh_token: str | None = None
    expires_in: float | None = None
    refresh_expires_in: float | None = None
    token_endpoint: str | None = None
    client_id: str | None = None
    refresh_lifetime_days: float | None = None
    api_base_url: str | None = None
    legacy: bool = False
    legacy_expires_at: float | None = None
    replace_chain: bool = False  # --yes: a static token may replace a live OAuth chain

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ImportRequest:
        allowed = set(cls.__dataclass_fields__)
        extra = set(data) - allowed - {"op", "id"}
        if extra:
            raise InputError(f"import: unknown fields {sorted(extra)[:5]}")
        try:
            req = cls(**{k: v for k, v in data.items() if k in allowed})
        except TypeError as exc:
            raise InputError("import: 'profile' and 'access_token' are required") from exc
        for name in ("profile", "access_token"):
            if not isinstance(getattr(req, name), str):
                raise InputError(f"import: '{name}' must be a string")
        for name in ("refresh_token", "token_endpoint", "client_id", "api_base_url"):
            if not isinstance(getattr(req, name), str | None):
                raise InputError(f"import: '{name}' must be a string")
        numbers: dict[str, Any] = {  # "3600" on the wire is 3600.0 in the request
            name: _number_or_none(getattr(req, name), name)
            for name in (
                "expires_in",
                "refresh_expires_in",
                "refresh_lifetime_days",
                "legacy_expires_at",
            )
        }
        if not isinstance(req.legacy, bool):
            raise InputError("import: 'legacy' must be true or false")
        if not isinstance(req.replace_chain, bool):
            raise InputError("import: 'replace_chain' must be true or false")
        return replace(req, **numbers)

    def __repr__(self) -> str:
        return f"ImportRequest(profile={self.profile!r}, legacy={self.legacy})"


def _number_or_none(
    value: object, name: str, maximum: float = MAX_NUMBER, minimum: float = 0.0
) -> float | None:
    if value is None:
        return None
    what = _OPTION.get(name, f"'{name}'")
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = float(value)  # isdigit alone admits '²', which int() refuses
    number = json_number(value)
    if number is None:
        raise InputError(f"import: {what} must be a number")
    if not math.isfinite(number):
        raise InputError(f"import: {what} must be a finite number, not {number}")
    if number <= 0:
        raise InputError(f"import: {what} must be positive")
    if number < minimum:
        raise InputError(f"import: {what} must be at least {minimum:g}")
    if number > maximum:
        raise InputError(f"import: {what} is too large (at most {maximum:g})")
    return number


def parse_expiry_date(text: str) -> float:
    """``--expires``: an ISO 8601 date or time (UTC unless it has an offset) as epoch seconds."""
    shown = text[:40]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise InputError(
            f"--expires {shown!r} is not an ISO date like 2027-01-31 or "
            "2027-01-31T12:00:00+01:00 (offsets lie within +-23:59)"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        epoch = when.timestamp()
    except (OverflowError, ValueError) as exc:  # year 1 with a positive offset
        raise InputError(f"--expires {shown!r} is out of range; give a date after 1970") from exc
    if not 0 < epoch <= MAX_NUMBER:
        raise InputError(f"--expires {shown!r} is out of range; give a date from 1970 to 2286")
    return epoch


def clean_token(value: str, which: str) -> str:
    """A pasted token without what commonly comes along with it, or TokenFormatError.

    Removed when unambiguous: surrounding whitespace (CR/LF included), one pair of matching
    quotes, and a ``Bearer `` prefix. Anything else odd is refused, never echoed.
    """
    value = value.strip()
    for _ in range(2):  # '"Bearer x"' and 'Bearer "x"' both occur
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1].strip()
        if value[:7].lower() == "bearer " or value[:7].lower() == "bearer\t":
            value = value[7:].strip()
    if not value or value.lower() == "bearer":
        raise TokenFormatError(f"{which}: it is empty")
    if len(value) > MAX_TOKEN_BYTES:
        raise TokenFormatError(f"{which}: longer than {MAX_TOKEN_BYTES} bytes")
    if not value.isascii() or not value.isprintable() or any(c.isspace() for c in value):
        raise TokenFormatError(f"{which}: it contains spaces, control or non-ASCII characters")
    if any(c in "'\"\\" for c in value):
        raise TokenFormatError(
            f"{which}: it contains a quote or backslash (unbalanced quoting?); paste the bare token"
        )
    return value


def parse_import_text(text: str, *, profile: str, legacy: bool = False) -> ImportRequest:
    """Read pasted tokens into a request (options are added by the caller)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_INPUT_BYTES:
        raise InputError(
            f"import: input is larger than {MAX_INPUT_BYTES} bytes; paste only the tokens"
        )
    # A byte-order mark: JSON saved by Windows Notepad or PowerShell's '>' starts with one.
    stripped = text.removeprefix("\ufeff").strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except (ValueError, RecursionError) as exc:
            raise InputError("import: input starts with '{' but is not valid JSON") from exc
        if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
            raise InputError("import: the JSON object has no string 'access_token'")
        refresh = data.get("refresh_token")
        if refresh is not None and not isinstance(refresh, str):
            raise InputError("import: 'refresh_token' in the JSON object must be a string")
        if not legacy and not refresh:
            raise InputError(
                "import: the JSON object has no 'refresh_token' (use --legacy for a static token)"
            )
        return ImportRequest(
            profile=profile,
            access_token=data["access_token"],
            refresh_token=None if legacy else refresh,
            expires_in=_number_or_none(
                data.get("expires_in"),
                "expires_in",
                MAX_ACCESS_LIFETIME_SECONDS,
                MIN_ACCESS_LIFETIME_SECONDS,
            ),
            refresh_expires_in=_number_or_none(
                data.get("refresh_token_expires_in"),
                "refresh_token_expires_in",
                MAX_REFRESH_LIFETIME_DAYS * DAY,
            ),
            legacy=legacy,
        )
    lines = [line.strip() for line in stripped.splitlines() if line.strip()]
    want = 1 if legacy else 2
    if len(lines) != want:
        shape = (
            "one line (the access token)"
            if legacy
            else "two lines (access token, then refresh token)"
        )
        raise InputError(
            f"import: expected {shape} or a token-endpoint JSON object; got {len(lines)} "
            "non-empty lines"
        )
    return ImportRequest(
        profile=profile,
        access_token=lines[0],
        refresh_token=None if legacy else lines[1],
        legacy=legacy,
    )


def _checked_times(claims: TokenClaims) -> TokenClaims:
    """``claims`` if its times are dates ``status`` can show and a state can hold."""
    for name, value in (("exp", claims.exp), ("iat", claims.iat)):
        if value is not None and not 0 < value <= MAX_NUMBER:
            raise TokenFormatError(
                f"access token: claim '{name}' is out of range (a date from 1970 to 2286)"
            )
    return claims


def check_api_base(url: str) -> str:
    """Return the AAC API base URL without its trailing slash, or raise InputError."""
    try:
        return check_endpoint(url, explicit=True).rstrip("/")
    except InputError as exc:
        raise InputError(
            str(exc)
            .replace("token endpoint", "API base URL")
            .replace("--token-endpoint", "--base-url")
        ) from exc


def _refuse_ended_chain(end: float, born: float, given: str, *, from_iat: bool) -> None:
    # The chain is dead by its own stated lifetime: importing it would only earn an
    # invalid_grant at the first refresh, and a status saying "expires in 0.0 hours" till then.
    since = "its access token's iat" if from_iat else "the import"
    born_day = datetime.fromtimestamp(born, UTC).date().isoformat()
    end_day = datetime.fromtimestamp(end, UTC).date().isoformat()
    raise InputError(
        f"import: this refresh token's lifetime ({given}, counted from {since}, {born_day}) "
        f"has already ended ({end_day}); generate a new token pair in AAC and import that"
    )


def build_state(req: ImportRequest, now: float) -> ProfileState:
    """The fresh state for an import; every problem is a one-line InputError."""
    profile = validate_profile_name(req.profile)
    access = clean_token(req.access_token, "access token")
    api = check_api_base(req.api_base_url or DEFAULT_API_BASE_URL)
    # No maximum here: the range check below names AAC's range, which says more.
    lifetime = _number_or_none(req.refresh_lifetime_days, "refresh_lifetime_days", math.inf)
    if lifetime is not None and not (
        MIN_REFRESH_LIFETIME_DAYS <= lifetime <= MAX_REFRESH_LIFETIME_DAYS
    ):
        raise InputError(
            f"import: --refresh-lifetime-days must be from {MIN_REFRESH_LIFETIME_DAYS:g} to "
            f"{MAX_REFRESH_LIFETIME_DAYS:g} (AAC's range), not {lifetime:g}"
        )
    refresh_expires_in = _number_or_none(
        req.refresh_expires_in, "refresh_expires_in", MAX_REFRESH_LIFETIME_DAYS * DAY
    )
    if req.legacy:
        expires = _number_or_none(req.legacy_expires_at, "legacy_expires_at")
        if expires is None:
            try:
                claims = parse_jwt(access)
            except TokenFormatError as exc:
                # Not a JWT (Designer Cloud's opaque tokens): no known expiry. But a JWT with
                # an unreadable time claim is refused: "never expires" would serve it forever.
                if "claim '" in str(exc):
                    raise
                claims = None
            expires = _checked_times(claims).exp if claims is not None else None
        return ProfileState(
            profile=profile, kind=TokenKind.LEGACY, access_token=access, refresh_token=None,
            token_endpoint=None, client_id=None, api_base_url=api, access_obtained_at=now,
            access_expires_at=expires, imported_at=now,
        )  # fmt: skip
    if req.refresh_token is None:
        raise InputError("import: a refresh token is required (use --legacy for a static token)")
    refresh = clean_token(req.refresh_token, "refresh token")
    expires_in = _number_or_none(
        req.expires_in, "expires_in", MAX_ACCESS_LIFETIME_SECONDS, MIN_ACCESS_LIFETIME_SECONDS
    )
    try:
        claims = _checked_times(parse_jwt(access))
    except TokenFormatError as exc:
        if expires_in is None or not req.token_endpoint or not req.client_id:
            raise TokenFormatError(
                f"{exc} (an opaque token needs the token-endpoint JSON with expires_in plus "
                "--token-endpoint and --client-id)"
            ) from exc
        claims = None
    if req.token_endpoint:
        endpoint = check_endpoint(req.token_endpoint, explicit=True)
    elif claims is not None and claims.iss:
        endpoint = check_endpoint(derive_endpoint(claims.iss), explicit=False)
    else:
        raise InputError("import: the access token names no issuer; pass --token-endpoint")
    client_id = req.client_id or (claims.client_id if claims else None)
    if not client_id:
        raise InputError("import: the access token has no 'client_id' claim; pass --client-id")
    if expires_in is not None:
        # JSON saved a while ago: its expires_in counts from when it was issued, so a JWT's
        # own exp, when there is one, is the better bound.
        obtained, expires = now, now + expires_in
        if claims is not None and claims.exp < expires:
            expires = claims.exp
            obtained = min(claims.iat, expires) if claims.iat is not None else min(now, expires)
    else:
        assert claims is not None
        iat = claims.iat if claims.iat is not None and claims.iat <= now else now
        obtained, expires = min(iat, claims.exp), claims.exp
    # AAC counts a refresh token's lifetime from the moment the pair was generated (rotation
    # does not extend it), and shows the access token generated with it: its iat is that
    # moment. Counting from the import instead would put the end days late for a pair pasted
    # days after it was generated, and its natural end would look like a theft.
    issued = None
    if claims is not None and claims.iat is not None and claims.iat <= now:
        issued = claims.iat
    born = issued if issued is not None else now
    refresh_expires = None
    if lifetime is not None:
        refresh_expires = born + lifetime * DAY
    elif refresh_expires_in is not None:
        refresh_expires = born + refresh_expires_in
    if refresh_expires is not None and refresh_expires <= now:
        given = "refresh_lifetime_days" if lifetime is not None else "refresh_token_expires_in"
        _refuse_ended_chain(refresh_expires, born, _OPTION[given], from_iat=born < now)
    return ProfileState(
        profile=profile, kind=TokenKind.OAUTH, access_token=access, refresh_token=refresh,
        token_endpoint=endpoint, client_id=client_id, api_base_url=api,
        access_obtained_at=obtained, access_expires_at=expires,
        refresh_expires_at=refresh_expires, imported_at=now, pair_issued_at=issued,
    )  # fmt: skip

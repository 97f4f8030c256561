"""API key and short-lived client secrets (the Realtime API's `POST /v1/realtime/client_secrets`).

With `[auth] api_key` set, creating a call needs `Authorization: Bearer <key>` or a client secret
(`ek_...`) minted with that key. A secret lives `client_secret_ttl_s` (or what the mint request asks
for, up to `max_client_secret_ttl_s`), may be used for any number of calls until it expires, and
carries the session settings given when it was minted (the call's defaults). Secrets live in memory:
a restart invalidates them, which is what a short-lived credential may do.

`[auth] page_secrets = true` lets the served page mint its own secret with a same-origin request
(browser-set `Origin` / `Sec-Fetch-Site` headers, which other web pages cannot forge). Any non-browser
client can forge those headers, so this only makes sense when the page itself is protected upstream
(reverse-proxy login, VPN); docs/protocol.md describes the patterns.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from server.config import AuthConfig
from server.edge.limits import ApiError

SECRET_PREFIX = "ek_"
MAX_LIVE_SECRETS = 100_000  # a bound on memory: minting past it first drops expired ones, then refuses
EXPIRED_REMEMBERED_S = (
    600.0  # an expired secret is still recognised this long, to answer expired_client_secret
)


@dataclass(frozen=True)
class ClientSecret:
    value: str
    expires_at: float  # unix s
    session: dict  # session fields given at mint time: the defaults of calls made with it


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _printable(token: str) -> bool:
    """Keys and secrets are ASCII; aiohttp hands other header bytes over as surrogate escapes."""
    return token.isascii() and token.isprintable()


def is_same_origin(request: web.Request, public_url: str) -> bool:
    """The browser says the request comes from a page of this server (never true for other sites)."""
    if request.headers.get("Sec-Fetch-Site") == "same-origin":
        return True
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return False
    netloc = urlsplit(origin).netloc
    ours = {request.host}
    if public_url:
        ours.add(urlsplit(public_url).netloc)
    return netloc in ours


class Auth:
    def __init__(self, config: AuthConfig, public_url: str) -> None:
        self.config = config
        self.public_url = public_url
        self._secrets: dict[str, ClientSecret] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.config.api_key)

    def _is_api_key(self, token: str) -> bool:
        return _printable(token) and hmac.compare_digest(token.encode(), self.config.api_key.encode())

    def authorize_call(self, request: web.Request) -> ClientSecret | None:
        """Raise 401 unless the request may create a call. Returns the secret used, if any."""
        if not self.enabled:
            return None
        token = bearer_token(request)
        if token is None:
            raise _unauthorized(
                "missing_api_key",
                "this server needs 'Authorization: Bearer <api key or client secret>' to create a call",
            )
        if token.startswith(SECRET_PREFIX):
            secret = self._secrets.get(token)
            if secret is None:
                raise _unauthorized(
                    "invalid_client_secret",
                    "the client secret is not known (or the server restarted): mint a new one",
                )
            if secret.expires_at <= time.time():
                raise _unauthorized("expired_client_secret", "the client secret has expired: mint a new one")
            return secret
        if not self._is_api_key(token):
            raise _unauthorized("invalid_api_key", "the API key is not valid")
        return None

    def authorize_mint(self, request: web.Request) -> None:
        """Minting needs the API key itself, or a same-origin page request when page_secrets is on."""
        if not self.enabled:
            return
        token = bearer_token(request)
        if token is not None and not token.startswith(SECRET_PREFIX) and self._is_api_key(token):
            return
        if token is None and self.config.page_secrets and is_same_origin(request, self.public_url):
            return
        if token is not None:
            raise _unauthorized(
                "invalid_api_key", "client secrets are minted with the API key, not a client secret"
            )
        raise _unauthorized(
            "missing_api_key", "minting a client secret needs 'Authorization: Bearer <api key>'"
        )

    def mint(self, body: dict) -> ClientSecret:
        """`body` is the Realtime request:
        {"expires_after": {"anchor": "created_at", "seconds": N}, "session": {}}."""
        seconds = self.config.client_secret_ttl_s
        expires_after = body.get("expires_after")
        if expires_after is not None:
            if (
                not isinstance(expires_after, dict)
                or expires_after.get("anchor", "created_at") != "created_at"
            ):
                raise ApiError(
                    400, "invalid_value", 'expires_after must be {"anchor": "created_at", "seconds": N}'
                )
            seconds = expires_after.get("seconds", seconds)
            limit = self.config.max_client_secret_ttl_s
            if isinstance(seconds, bool) or not isinstance(seconds, int) or not 10 <= seconds <= limit:
                raise ApiError(
                    400, "invalid_value", f"expires_after.seconds must be an integer in [10, {limit}]"
                )
        session = body.get("session") or {}
        if not isinstance(session, dict):
            raise ApiError(400, "invalid_value", "session must be an object")
        now = time.time()
        if len(self._secrets) >= MAX_LIVE_SECRETS:
            self._secrets = {k: s for k, s in self._secrets.items() if s.expires_at > now}
            if len(self._secrets) >= MAX_LIVE_SECRETS:
                raise ApiError(
                    503,
                    "too_many_client_secrets",
                    "too many live client secrets; retry later",
                    error_type="server_error",
                    headers={"Retry-After": "60"},
                )
        secret = ClientSecret(SECRET_PREFIX + secrets.token_urlsafe(24), now + seconds, session)
        self._secrets[secret.value] = secret
        return secret

    def prune(self) -> None:
        """Forget secrets that expired more than EXPIRED_REMEMBERED_S ago (until then a late use is told
        the secret expired, not that it is unknown)."""
        forget_before = time.time() - EXPIRED_REMEMBERED_S
        for key in [k for k, s in self._secrets.items() if s.expires_at <= forget_before]:
            del self._secrets[key]


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": 'Bearer realm="glm4voice"'})

"""Admission and request limits: the one place that says whether a request may go on.

Every refusal is an `ApiError`, rendered by `server/app.py` as `{"error": {"type", "code", "message"}}`
with the right HTTP status. Checks, in the order `admit_call()` runs them: cross-origin pages not on
the allow-list (403), per-address rate (429), draining for shutdown / engine not ready (503), the
concurrent-call limit (503). Authentication is `server/edge/auth.py`; token buckets are `TokenBucket`.
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit

from aiohttp import web

from server.call.guard import TokenBucket
from server.config import Config
from server.realtime import fields, session_update


class ApiError(Exception):
    """A request we refuse, with the HTTP status, a stable code and a message for people."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.error_type = error_type

    def response(self) -> web.Response:
        body = {"error": {"type": self.error_type, "code": self.code, "message": self.message}}
        return web.json_response(body, status=self.status, headers=self.headers)


class AddressRateLimiter:
    """One token bucket per client address (the table is pruned of full, idle buckets)."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate_per_s = per_minute / 60.0
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, address: str) -> None:
        if self.rate_per_s <= 0:
            return
        now = time.monotonic()
        if len(self._buckets) > 10_000:
            full_after_s = self.burst / self.rate_per_s
            self._buckets = {a: b for a, b in self._buckets.items() if now - b.t_s < full_after_s}
        bucket = self._buckets.setdefault(address, TokenBucket(self.rate_per_s, self.burst))
        if not bucket.take(now):
            retry = max(1, int(bucket.wait_s() + 0.999))
            raise ApiError(
                429,
                "rate_limited",
                f"too many requests from {address}: at most "
                f"{self.rate_per_s * 60:g} per minute; retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )


def client_address(request: web.Request, trust_forwarded_for: bool, trusted_hops: int = 1) -> str:
    """The address limits count against. Behind `trusted_hops` proxies we run, each appends the address
    it was reached from to X-Forwarded-For, so the client is the entry `trusted_hops` from the right:
    what lies left of it is whatever the client sent (rotating it must not evade the per-address rate,
    nor may naming a victim's address lock the victim out)."""
    if trust_forwarded_for:
        entries = [
            e.strip() for header in request.headers.getall("X-Forwarded-For", []) for e in header.split(",")
        ]
        entries = [e for e in entries if e]
        if entries:
            return entries[-min(trusted_hops, len(entries))]
    return request.remote or "unknown"


def allowed_origin(origin: str, allow: tuple[str, ...]) -> bool:
    return "*" in allow or origin.rstrip("/") in {a.rstrip("/") for a in allow}


def check_origin(request: web.Request, config: Config) -> None:
    """A browser page of another origin may only use the API when the allow-list names it.

    A cross-origin multipart POST needs no CORS preflight, so without this check a foreign page could
    create calls through its visitors' browsers even though it could not read the answer."""
    origin = request.headers.get("Origin")
    if not origin or request.headers.get("Sec-Fetch-Site") == "same-origin":
        return
    ours = {request.host}
    if config.http.public_url:
        ours.add(urlsplit(config.http.public_url).netloc)
    if urlsplit(origin).netloc in ours or allowed_origin(origin, config.http.cors_origins):
        return
    raise ApiError(
        403, "origin_not_allowed", f"pages from {origin} may not use this server (see [http] cors_origins)"
    )


class Admission:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.draining = False  # graceful shutdown: no new calls
        self.rate = AddressRateLimiter(
            config.limits.calls_per_minute_per_address, config.limits.call_burst_per_address
        )

    def check_rate(self, request: web.Request) -> None:
        http = self.config.http
        self.rate.check(client_address(request, http.trust_forwarded_for, http.trusted_proxy_hops))

    def admit_call(
        self,
        request: web.Request,
        active_calls: int,
        responder_ready: bool,
        not_ready_reason: str | None = None,
    ) -> None:
        """Raise ApiError if a new call may not start now (after auth and the rate check)."""
        limits = self.config.limits
        retry = {"Retry-After": str(limits.retry_after_s)}
        if self.draining:
            raise ApiError(
                503,
                "shutting_down",
                "the server is shutting down; retry on another instance",
                headers=retry,
                error_type="server_error",
            )
        if not responder_ready:
            if not_ready_reason:
                raise ApiError(
                    503,
                    "engine_unavailable",
                    f"the speech engine is not available: {not_ready_reason}",
                    headers=retry,
                    error_type="server_error",
                )
            raise ApiError(
                503,
                "not_ready",
                "the server is still loading the model; retry shortly",
                headers=retry,
                error_type="server_error",
            )
        if active_calls >= limits.max_calls:
            raise ApiError(
                503,
                "server_full",
                f"the server is at its limit of {limits.max_calls} concurrent calls; "
                f"retry in {limits.retry_after_s} s",
                headers={"Retry-After": str(limits.retry_after_s)},
                error_type="server_error",
            )

    async def read_body(self, request: web.Request) -> bytes:
        """The request body, refusing oversized ones before reading them when the client says its size."""
        limit = self.config.http.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(
                413,
                "body_too_large",
                f"request body is {request.content_length} bytes; the limit is {limit} bytes",
            )
        body = bytearray()

        async def read() -> None:
            async for chunk in request.content.iter_chunked(16_384):
                body.extend(chunk)
                if len(body) > limit:
                    raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")

        try:
            await asyncio.wait_for(read(), self.config.http.body_timeout_s)
        except ConnectionError:
            raise client_gone() from None
        except TimeoutError:
            raise body_timeout(self.config.http.body_timeout_s) from None
        return bytes(body)


def body_timeout(timeout_s: float) -> ApiError:
    return ApiError(
        408,
        "request_timeout",
        f"the request body did not arrive within {timeout_s:g} s",
        headers={"Connection": "close"},
    )


def client_gone() -> ApiError:
    """The client hung up mid-body: a 4xx like any refusal (nobody reads it), no traceback."""
    return ApiError(400, "client_disconnected", "the client closed the connection before the body was read")


async def read_form(request: web.Request, limit: int, timeout_s: float):
    """A multipart or urlencoded form (bounded by client_max_size), or a 4xx saying what is wrong."""
    try:
        return await asyncio.wait_for(request.post(), timeout_s)
    except TimeoutError:
        raise body_timeout(timeout_s) from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes") from None
    except ConnectionError:
        raise client_gone() from None
    except LookupError as exc:  # charset=<unknown> on the body or on a part
        raise ApiError(400, "invalid_body", f"the form names an unknown charset: {exc}") from None
    except (
        ValueError,
        RuntimeError,
    ) as exc:  # aiohttp: RuntimeError for an unknown Content-Transfer-Encoding
        raise ApiError(400, "invalid_body", f"the form could not be read: {exc}") from None


def parse_session(session: dict, config: Config) -> session_update.SessionUpdate:
    """Session fields from an offer or a client-secret mint, read as a `session.update` would be. The
    request body was size-checked and parsed already: the fields are read from the object itself (a
    round trip through JSON text cost twice the parse again)."""
    try:
        return session_update.parse_session_update(
            {"type": "session.update", "session": session}, None, config.limits.max_instructions_chars
        )
    except fields.ProtocolError as exc:
        raise ApiError(400, exc.code, f"session: {exc.message}") from None
    except (ValueError, TypeError, RecursionError):  # a field check that raises instead of refusing: a 400
        raise ApiError(400, "invalid_value", "session: the object cannot be read") from None


MAX_JSON_CONTAINERS = 1_000  # arrays + objects in a request body: ours need tens; 20 000 empty lists
# in a 60 KB body are ~1 MB of Python objects, and a flood of them runs the whole process's garbage
# collector again and again (docs/robustness.md)


def loads_json(text: str | bytes, what: str, hint: str = "") -> object:
    """JSON from a client, or 400: nesting deeper than the parser's recursion limit is invalid too, and
    so is a body with more than MAX_JSON_CONTAINERS brackets (counted before it is parsed; brackets
    inside strings count too)."""
    opening = ("[", "{") if isinstance(text, str) else (b"[", b"{")
    if text.count(opening[0]) + text.count(opening[1]) > MAX_JSON_CONTAINERS:
        raise ApiError(
            400, "invalid_json", f"{what} has more than {MAX_JSON_CONTAINERS} arrays and objects{hint}"
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", f"{what} is not valid JSON{hint}") from None

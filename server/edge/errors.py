"""The HTTP edge every route goes through: CORS (preflight and headers) and one JSON shape for errors.

Every refusal is an `ApiError` (server/edge/limits.py), rendered as `{"error": {"type", "code", "message"}}`.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_log import AccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from server.config import HttpConfig
from server.edge.limits import ApiError, allowed_origin, client_gone
from server.logs import LogLimiter

log = logging.getLogger("glm4voice.http")

CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Expose-Headers": "Location, Retry-After",
    "Access-Control-Max-Age": "600",
    "Vary": "Origin",
}
# Realtime client libraries send their own headers with the offer (X-OpenAI-Agents-SDK, OpenAI-Beta,
# OpenAI-Organization, OpenAI-Project, ...): an allowed origin's preflight gets the names it asks for.
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")
MAX_REQUESTED_HEADERS_CHARS = 1_000


def allowed_headers(request: web.Request) -> str:
    """`Access-Control-Allow-Headers`: ours, plus the well-formed header names a preflight requests."""
    requested = request.headers.get("Access-Control-Request-Headers", "").strip()
    if (
        request.method != "OPTIONS"
        or not requested
        or len(requested) > MAX_REQUESTED_HEADERS_CHARS
        or not _HEADER_LIST.match(requested)
    ):
        return CORS_HEADERS["Access-Control-Allow-Headers"]
    names = ["Authorization", "Content-Type"]
    names += [
        n.strip() for n in requested.split(",") if n.strip().lower() not in ("authorization", "content-type")
    ]
    return ", ".join(names)


def make_preflight(http: HttpConfig):
    async def preflight(request: web.Request) -> web.Response:
        """CORS preflight; the CORS middleware adds the headers when the origin is on the allow-list."""
        origin = request.headers.get("Origin", "")
        if not allowed_origin(origin, http.cors_origins):
            raise ApiError(
                403,
                "origin_not_allowed",
                f"pages from {origin or 'no origin'} may not use this server (see [http] cors_origins)",
            )
        return web.Response(status=204)

    return preflight


def make_cors_middleware(http: HttpConfig):
    @web.middleware
    async def cors_middleware(request: web.Request, handler) -> web.StreamResponse:
        """`Access-Control-Allow-Origin` for origins on `[http] cors_origins` (errors included)."""
        response = await handler(request)
        origin = request.headers.get("Origin")
        if origin and allowed_origin(origin, http.cors_origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.update(CORS_HEADERS)
            response.headers["Access-Control-Allow-Headers"] = allowed_headers(request)
            if request.method == "OPTIONS":
                response.headers["Vary"] = "Origin, Access-Control-Request-Headers"
        return response

    return cors_middleware


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return ApiError(
            exc.status,
            exc.reason.lower().replace(" ", "_"),
            exc.text or exc.reason,
            headers={k: v for k, v in exc.headers.items() if k == "Allow"},
        ).response()
    except ConnectionError:  # the client went away while we read: nobody to answer, nothing to trace
        log.debug("client disconnected during %s %s", request.method, request.path)
        return client_gone().response()
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return ApiError(500, "server_error", "internal server error", error_type="server_error").response()


class QuietBadRequests(logging.Filter):
    """aiohttp logs a malformed request (a 4xx it answers itself: bad request line, header too long,
    bad chunking) at ERROR with a traceback. It is the client's fault: one WARNING line, no traceback,
    rate-limited. Other errors aiohttp logs stay as they are."""

    def __init__(self, limiter: LogLimiter | None = None) -> None:
        super().__init__()
        self.limiter = limiter or LogLimiter()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or not 400 <= (exc.code or 0) < 500:
            return True
        allow, suppressed = self.limiter.allow()
        if not allow:
            return False
        detail = (str(exc.message or "").splitlines() or [""])[0][:200]
        what = record.getMessage()
        record.msg = "%s: %s %s" + (f" ({suppressed} more not logged)" if suppressed else "")
        record.args = (what, type(exc).__name__, detail)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True


class QuietAccessLog(AccessLogger):
    """The access log, with the lines for refusals a flood makes by the thousand (401 wrong key, 429 over
    the rate or blocked) cut to one per status per `LogLimiter` interval, saying how many were left out.
    Decided before the line is formatted: formatting it was a third of what such a refusal cost."""

    QUIET_STATUSES = (401, 429)

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self.limiters = {status: LogLimiter() for status in self.QUIET_STATUSES}

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        limiter = self.limiters.get(response.status)
        if limiter is None:
            super().log(request, response, time)
            return
        allow, suppressed = limiter.allow()
        if not allow:
            return
        super().log(request, response, time)
        if suppressed:
            self.logger.info("(%d more %d responses not logged)", suppressed, response.status)


def quiet_library_logs() -> None:
    """Library loggers that flood or shout about client mistakes (idempotent)."""
    logging.getLogger("aioice").setLevel(
        max(logging.getLogger().level, logging.WARNING)
    )  # per-packet chatter
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietBadRequests) for f in server_log.filters):
        server_log.addFilter(QuietBadRequests())

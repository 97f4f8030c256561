"""Admission and request limits: the one place that says whether a request may go on.

Every refusal is an `ApiError`, rendered by `server/app.py` as `{"error": {"type", "code", "message"}}`
with the right HTTP status. Call admission (the number of concurrent calls) lives here; authentication,
per-address rate limits and the like belong here too, as further checks in `admit_call()`.
"""

from __future__ import annotations

from aiohttp import web

from server.config import Config


class ApiError(Exception):
    """A request we refuse, with the HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.error_type = error_type

    def response(self) -> web.Response:
        body = {"error": {"type": self.error_type, "code": self.code, "message": self.message}}
        return web.json_response(body, status=self.status, headers=self.headers)


class Admission:
    def __init__(self, config: Config) -> None:
        self.config = config

    def admit_call(self, request: web.Request, active_calls: int, responder_ready: bool) -> None:
        """Raise ApiError if a new call may not start now."""
        limits = self.config.limits
        if not responder_ready:
            raise ApiError(503, "not_ready", "the server is still loading the model; retry shortly",
                           headers={"Retry-After": str(limits.retry_after_s)}, error_type="server_error")
        if active_calls >= limits.max_calls:
            raise ApiError(503, "server_full",
                           f"the server is at its limit of {limits.max_calls} concurrent calls; "
                           f"retry in {limits.retry_after_s} s",
                           headers={"Retry-After": str(limits.retry_after_s)}, error_type="server_error")

    async def read_body(self, request: web.Request) -> bytes:
        """The request body, refusing oversized ones before reading them when the client says its size."""
        limit = self.config.http.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "body_too_large", f"request body is {request.content_length} bytes; the limit is "
                           f"{limit} bytes")
        body = bytearray()
        async for chunk in request.content.iter_chunked(16_384):
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        return bytes(body)

"""Structured logs: every line carries the call it belongs to, as text or as one JSON object per line.

The call id travels in a context variable: `server/app.py` sets it while it answers a call's offer, so
the tasks aiortc and aioice start for that call (ICE, DTLS, consent checks) inherit it, and
`server/call/call.py` runs its own tasks and callbacks under it. `CallIdFilter` copies it onto each record
(`record.call_id`, "-" outside a call); a record may also bring its own through `extra={"call_id": ...}`
(the engine thread does, it has no asyncio context).

A call id is the capability to hang the call up (`POST /v1/realtime/calls/{id}/hangup` needs nothing
else), so it is never written to the log: `CallIdFilter` prints `call_tag(id)`, a short one-way hash of
it, wherever it comes from. Whoever holds an id can compute its tag (the first 12 hex digits of its
sha256); the log cannot give the id back.

User content (typed text, instructions, audio) is never logged unless `[logging] log_user_content`.

Floods (a client repeating an event that fails, a sender over real time, malformed HTTP) are logged
through a `LogLimiter`: the first line at once, then at most one a `interval_s` saying how many were
not written.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import time

current_call_id: contextvars.ContextVar[str] = contextvars.ContextVar("call_id", default="-")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s call=%(call_id)s %(message)s"


def call_tag(call_id: str) -> str:
    """What the log shows for a call: 12 hex digits of sha256(call id); "-" stays "-"."""
    if call_id in ("", "-"):
        return "-"
    return hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]


CALL_ID_IN_TEXT = re.compile(
    r"rtc_[0-9a-f]{24}"
)  # server/call/call.py new_call_id (the access log's hangup URLs)


class CallIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "call_tagged", False):  # a record seen by two handlers is tagged once
            return True
        record.call_id = call_tag(getattr(record, "call_id", None) or current_call_id.get())
        record.call_tagged = True
        message = record.getMessage()
        if "rtc_" in message:
            record.msg, record.args = CALL_ID_IN_TEXT.sub(lambda m: call_tag(m.group()), message), ()
        return True


class LogLimiter:
    """At most one line per `interval_s` for one kind of flood; `allow()` says whether to write this one
    and how many were left out since the last one written."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last_s = float("-inf")
        self._suppressed = 0

    def allow(self, now_s: float | None = None) -> tuple[bool, int]:
        now_s = time.monotonic() if now_s is None else now_s
        if now_s - self._last_s < self.interval_s:
            self._suppressed += 1
            return False, 0
        self._last_s, suppressed, self._suppressed = now_s, self._suppressed, 0
        return True, suppressed


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "call_id", "msg"[, "exc"]} per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "call_id": getattr(record, "call_id", "-"),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str, stream=None) -> logging.Handler:
    """Install one root handler with the call-id filter; returns it (tests remove it again)."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(CallIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def run_as_call(call_id: str) -> contextvars.Context:
    """A copy of the current context with `current_call_id` set: for tasks and callbacks of one call."""
    ctx = contextvars.copy_context()
    ctx.run(current_call_id.set, call_id)
    return ctx

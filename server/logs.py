"""Structured logs: every line carries the call it belongs to, as text or as one JSON object per line.

The call id travels in a context variable: `server/app.py` sets it while it answers a call's offer, so
the tasks aiortc and aioice start for that call (ICE, DTLS, consent checks) inherit it, and
`server/call.py` runs its own tasks and callbacks under it. `CallIdFilter` copies it onto each record
(`record.call_id`, "-" outside a call); a record may also bring its own through `extra={"call_id": ...}`
(the engine thread does, it has no asyncio context).

User content (typed text, instructions, audio) is never logged unless `[logging] log_user_content`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

current_call_id: contextvars.ContextVar[str] = contextvars.ContextVar("call_id", default="-")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s call=%(call_id)s %(message)s"


class CallIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "call_id", None):
            record.call_id = current_call_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "call_id", "msg"[, "exc"]} per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
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
    logging.getLogger("aioice").setLevel(max(root.level, logging.WARNING))  # per-packet chatter at INFO
    return handler


def run_as_call(call_id: str) -> contextvars.Context:
    """A copy of the current context with `current_call_id` set: for tasks and callbacks of one call."""
    ctx = contextvars.copy_context()
    ctx.run(current_call_id.set, call_id)
    return ctx

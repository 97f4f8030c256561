"""A client event's way into its call: the event rate, parsing, what a control connection may send, the
engine's own rate for events that make it work, and the handler each event goes to.

The call owns one `ClientEvents`; `Call.receive` hands it every message a transport or a control
connection receives. Whatever goes wrong, nothing escapes into the caller: a client's mistake is one
`error` event, a failure inside a handler (a bug) is `error server_error` and a rate-limited log line,
and the call goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from pipeline.responder import ReplyOptions, ResponderSession
from server.call.guard import CallGuard
from server.call.items import Items
from server.call.listening import Listening
from server.call.replies import ReplyFlow
from server.call.settings import CallSettings
from server.config import Config
from server.logs import LogLimiter, current_call_id
from server.metrics import Metrics
from server.realtime import events, fields, session_update
from server.realtime import protocol as P
from server.realtime.events import new_id as _new_id

CONTROL_ONLY = (
    "a control connection may send session.update, conversation.item.create, response.create and "
    "response.cancel"
)


class Call(Protocol):
    """What the client events read and call of the call that owns them (server/call/call.py)."""

    call_id: str
    config: Config
    guard: CallGuard
    items: Items
    listening: Listening
    log: logging.LoggerAdapter
    metrics: Metrics
    replies: ReplyFlow
    session: ResponderSession
    settings: CallSettings

    def send(self, message: dict) -> None: ...

    def charge(self, event: P.ClientEvent) -> None: ...

    def update_session(self, update: session_update.SessionUpdate) -> None: ...


class ClientEvents:
    def __init__(self, call: Call) -> None:
        self._call = call
        self._failures = LogLimiter()  # a client repeating an event that fails: one line per interval

    def receive(
        self,
        message: str | bytes,
        only: tuple[type[P.ClientEvent], ...] | None = None,
        answer: Callable[[dict], None] | None = None,
    ) -> None:
        """A client event from the transport (or, `only` the events it may send, from a control
        connection; `answer`: where its errors go). Whatever goes wrong, nothing escapes into the caller
        (aiortc's receive loop would end, and the call with it): a failure is one `error` event and a
        rate-limited log line."""
        token = current_call_id.set(self._call.call_id)
        try:
            self._receive(message, only, answer or self._call.send)
        except Exception:
            self._failed(None, answer or self._call.send)
        finally:
            current_call_id.reset(token)

    def _failed(self, event_id: str | None, answer: Callable[[dict], None]) -> None:
        """Handling a client event raised (a bug): `error server_error` naming the event, one log line
        per interval; the call goes on."""
        self._call.metrics.events_failed.inc()
        allow, suppressed = self._failures.allow()
        if allow:
            self._call.log.exception(
                "client event failed%s", f" ({suppressed} more since the last line)" if suppressed else ""
            )
        try:
            answer(
                events.error_event(
                    "server_error",
                    "the event could not be handled; the call goes on",
                    event_id=event_id,
                    error_type="server_error",
                )
            )
        except Exception:  # the channel itself is failing; the close path will notice
            pass

    def _receive(
        self,
        message: str | bytes,
        only: tuple[type[P.ClientEvent], ...] | None,
        answer: Callable[[dict], None],
    ) -> None:
        call = self._call
        limits = call.config.limits
        accept, complain = call.guard.event_arrived(time.monotonic())
        if not accept:
            call.metrics.events_dropped.inc()
            if complain:
                answer(
                    events.error_event(
                        "rate_limited",
                        f"more than {limits.max_events_per_s:g} events per second: "
                        f"events are being dropped ({call.guard.events_dropped} so far)",
                        event_id=P.peek_event_id(message),  # the dropped event that complains
                    )
                )
            return
        try:
            event = P.parse_client_event(
                message,
                max_event_bytes=limits.max_event_bytes,
                max_text_chars=limits.max_text_chars,
                max_instructions_chars=limits.max_instructions_chars,
            )
            if only is not None and not isinstance(event, only):
                raise fields.ProtocolError("unsupported_value", CONTROL_ONLY, event.event_id, "type")
            if self._makes_engine_work(event):
                call.charge(event)
            self.handle(event)
        except fields.ProtocolError as exc:
            answer(events.error_event(exc.code, exc.message, event_id=exc.event_id, param=exc.param))
        except Exception:
            self._failed(event.event_id, answer)

    def _makes_engine_work(self, event: P.ClientEvent) -> bool:
        """Charged before they are handled (truncates and deletes are charged once they are found valid,
        in server/call/items.py)."""
        if isinstance(event, P.ResponseCreate):
            return True
        return isinstance(event, session_update.SessionUpdate) and event.instructions not in (
            None,
            self._call.settings.instructions,
        )

    def handle(self, event: P.ClientEvent) -> None:
        call = self._call
        if isinstance(event, session_update.SessionUpdate):
            call.update_session(event)
        elif isinstance(event, P.ItemCreate):
            call.items.create(event)
        elif isinstance(event, P.ResponseCreate):
            if call.replies.generating:
                raise fields.ProtocolError(
                    "conversation_already_has_active_response",
                    "Conversation already has an active response in progress: send response.cancel first",
                    event.event_id,
                )
            options = None if event.instructions is None else ReplyOptions(instructions=event.instructions)
            call.replies.start(None, options, event.metadata, event.event_id)
        elif isinstance(event, P.InputAudioCommit | P.InputAudioClear):
            self._input_audio(event)
        elif isinstance(event, P.ResponseCancel):
            if call.replies.current is None:
                raise fields.ProtocolError(
                    "response_cancel_not_active",
                    "Cancellation failed: no active response found",
                    event.event_id,
                )
            call.replies.interrupt("client_cancelled")
        elif isinstance(event, P.OutputAudioClear):  # idempotent: clients send it after every cancel
            call.replies.interrupt("client_cancelled")
        elif isinstance(event, P.InputAudioAppend):  # a WebSocket transport takes these itself
            raise fields.ProtocolError(
                "unknown_event",
                "input_audio_buffer.append is for the WebSocket transport; "
                "over WebRTC the audio comes on the track",
                event.event_id,
                "type",
            )
        elif isinstance(event, P.ItemRetrieve | P.ItemDelete | P.ItemTruncate):
            call.items.edit(event)
        elif isinstance(event, P.Ping):
            call.send(events.event("glm4voice.pong", ping_event_id=event.event_id))

    def _input_audio(self, event: P.InputAudioCommit | P.InputAudioClear) -> None:
        """Push-to-talk: the client ends the turn (commit) or drops what it said (clear)."""
        call = self._call
        if call.settings.turns.enabled:
            raise fields.ProtocolError(
                "turn_detection_enabled",
                "server VAD commits turns itself; set turn_detection to null for push-to-talk",
                event.event_id,
            )
        item_id = _new_id("item")
        call.listening.turn_audio_reset()
        if isinstance(event, P.InputAudioCommit):
            call.session.commit_audio()
            call.items.user_item_committed(item_id, None)
        else:
            call.session.discard_audio()
            call.send(events.event("input_audio_buffer.cleared"))

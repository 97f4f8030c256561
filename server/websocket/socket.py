"""The WebSocket door: `GET /v1/realtime` upgraded, the same events, session and engine as a WebRTC
call, with the audio in the events (`input_audio_buffer.append` in, `response.output_audio.delta` out)
in the session's format (server/audio/codecs.py). `?model=` is accepted and ignored.

A WebSocket call is a `Call` on a `WebSocketTransport` (server/websocket/transport.py); appended audio
goes through the same VAD and turns. Admission (server/admission.py), limits, timeouts and clean-up are
a WebRTC call's; what differs is said where it is done:

- auth: `Authorization: Bearer` or, for browsers (which cannot set headers on a WebSocket), the
  `openai-insecure-api-key.<key>` subprotocol beside `realtime`;
- barge-in cancels at speech start (server/call/listening.py): the server cannot hear what the client
  played;
- liveness: the WebSocket's own ping (a peer that sends no audio is not gone);
- a client that reads too slowly is closed (code 1008) once `MAX_SEND_QUEUE_BYTES` wait for it;
- every message is counted, by number and bytes, before it is read (server/call/guard.py): past the
  budget the socket is left unread until it refills, and a message over the byte budget is dropped;
  appended audio faster than real time (beyond `MAX_AUDIO_AHEAD_S`) is dropped; drops, and malformed
  appends, get one error a second, and waits and drops for `inbound_flood_s` end the call as they end
  a WebRTC call that floods: an `error` and `glm4voice.call.closing` (`inbound_flood`), then the socket
  closes with code 1008 and the reason.

`GET /v1/realtime?call_id=rtc_...` with the API key is a control connection to a live call: it
receives the call's events (our `glm4voice.*` ones too, unless `?glm4voice_events=off`) and may send
`session.update`, `conversation.item.create`, `response.create`, `response.cancel`, which count against
the call's own event budget.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_websocket import WebSocketError
from multidict import CIMultiDict

from server.admission import admit, check_door, extension_events, open_call
from server.audio.codecs import InputDecoder, wire_rate_hz
from server.call.call import Call, new_call_id
from server.call.guard import MAX_MESSAGE_BYTES_PER_S, MAX_MESSAGES_PER_S
from server.call.resume import RESUME_HEADER
from server.context import ServerContext
from server.edge.limits import ApiError
from server.realtime import events, fields, session_update
from server.realtime import protocol as P
from server.websocket.transport import MAX_SEND_QUEUE_BYTES, SocketWriter, WebSocketTransport

log = logging.getLogger("glm4voice.websocket")
KEY_PROTOCOL_PREFIX = "openai-insecure-api-key."
MAX_MESSAGE_BYTES = 1 << 20  # one append: ~16 s of 24 kHz PCM in base64; anything larger is refused
# Appends take their own path (a larger size bound, errors at most once a second). Which path a message
# takes is read from its text, not by parsing it: each message is parsed once, by the parser that applies
# the size and container limits. A match that is not an append (the words inside a string) is parsed again
# on the call's path, so the worst case is the two parses a peek would always cost.
_APPEND_TYPE = re.compile(r'"type"\s*:\s*"input_audio_buffer\.append"')
MAX_AUDIO_AHEAD_S = 10.0  # appended audio may run this far ahead of the wall clock (a client's buffer)
HEARTBEAT_S = 10.0  # WebSocket ping; no pong within half of it closes the connection
MAX_READ_PAUSE_S = 0.5  # a socket over its budget is left unread this long at most between checks
MAX_CLOSE_REASON_BYTES = 123  # what a WebSocket close frame can carry (RFC 6455 section 5.5)
CONTROL_EVENTS = (session_update.SessionUpdate, P.ItemCreate, P.ResponseCreate, P.ResponseCancel)


class AudioPolicer:
    """Appended audio may not outrun the wall clock by more than MAX_AUDIO_AHEAD_S (real-time clients
    stay near 0; a file streamed at once is cut there)."""

    def __init__(self) -> None:
        self._start_s: float | None = None
        self._audio_s = 0.0

    def accept(self, now_s: float, duration_s: float) -> bool:
        """-> keep the audio."""
        if self._start_s is None:
            self._start_s = now_s
        if self._audio_s + duration_s - (now_s - self._start_s) > MAX_AUDIO_AHEAD_S:
            return False
        self._audio_s += duration_s
        return True


def _subprotocols(request: web.Request) -> list[str]:
    return [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]


def _with_subprotocol_key(request: web.Request) -> web.Request:
    """A browser's key in the subprotocol list, read as the `Authorization: Bearer` header it cannot set."""
    keys = [
        p[len(KEY_PROTOCOL_PREFIX) :] for p in _subprotocols(request) if p.startswith(KEY_PROTOCOL_PREFIX)
    ]
    if not keys or request.headers.get("Authorization"):
        return request
    headers = CIMultiDict(request.headers)
    headers["Authorization"] = f"Bearer {keys[0]}"
    return request.clone(headers=headers)


class RealtimeSocket:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if "call_id" in request.query:
            return await self._control(request)
        return await self._call(request)

    async def _upgrade(self, request: web.Request) -> web.WebSocketResponse:
        offered = _subprotocols(request)
        ws = web.WebSocketResponse(
            protocols=("realtime",) if "realtime" in offered else (),
            max_msg_size=MAX_MESSAGE_BYTES,
            heartbeat=HEARTBEAT_S,
        )
        if not ws.can_prepare(request).ok:
            raise ApiError(
                426,
                "upgrade_required",
                "GET /v1/realtime is a WebSocket endpoint (Upgrade: websocket)",
                headers={"Upgrade": "websocket"},
            )
        await ws.prepare(request)
        return ws

    async def _call(self, request: web.Request) -> web.StreamResponse:
        """Admission as for an offer (server/admission.py), refused before the upgrade."""
        ctx = self.ctx
        secret = check_door(ctx, _with_subprotocol_key(request))
        token = request.headers.get(RESUME_HEADER) or request.query.get("resume_token") or None
        admitted = await admit(ctx, request, secret, resume_token=token)
        ws = await self._upgrade(request)
        call: Call | None = None
        writer = SocketWriter(ws, lambda: _slow_reader(call, ws))
        transport = WebSocketTransport(writer)
        call = open_call(ctx, new_call_id(), transport, admitted)
        transport.bind(call)
        writer_task = asyncio.get_running_loop().create_task(writer.run(), name=f"{call.call_id}:ws-writer")
        decoder, policer = InputDecoder(), AudioPolicer()
        call.connected()
        call.start()
        lost = False
        try:
            lost = await _read_until_closed(ws, call, lambda event: _append(call, decoder, policer, event))
        finally:
            ended_by_server = call.closed.is_set()
            lost = lost and not writer.overflowed  # a reader too slow was closed by us: not a drop
            reason = call.close_reason or ("websocket lost" if lost else "websocket closed")
            await call.close(reason, network_lost=lost)
            writer.stop()
            await asyncio.wait([writer_task], timeout=1.0)
            writer_task.cancel()
            if ended_by_server:  # a limit ended the call: the close frame says which
                reason = call.close_reason.encode("utf-8", "replace")[:MAX_CLOSE_REASON_BYTES]
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=reason)
            await ws.close()
        return ws

    async def _control(self, request: web.Request) -> web.StreamResponse:
        """A server-side app steering a live call: the API key only (never a client secret). It observes
        the call's events, and its own events take the call's per-call budget (server/call/call.py)."""
        ctx = self.ctx
        secret = check_door(ctx, _with_subprotocol_key(request))
        if secret is not None:
            raise ApiError(
                403, "api_key_required", "a control connection needs the API key, not a client secret"
            )
        events_on = extension_events(request, default=True)
        call = ctx.calls.get(request.query["call_id"])
        if call is None:
            raise ApiError(404, "call_not_found", f"no active call {request.query['call_id']!r}")
        ws = await self._upgrade(request)
        writer = SocketWriter(ws, lambda: asyncio.ensure_future(ws.close(code=1008, message=b"slow reader")))
        writer_task = asyncio.get_running_loop().create_task(
            writer.run(), name=f"{call.call_id}:control-writer"
        )
        stop_observing = call.observe(writer.send, events_on)
        closed = asyncio.ensure_future(call.closed.wait())
        try:
            reader = asyncio.ensure_future(_read_control(ws, call, writer))
            await asyncio.wait([reader, closed], return_when=asyncio.FIRST_COMPLETED)
            reader.cancel()
        finally:
            closed.cancel()
            stop_observing()
            writer.stop()
            await asyncio.wait([writer_task], timeout=1.0)
            writer_task.cancel()
            await ws.close()
        return ws


def _slow_reader(call: Call | None, ws: web.WebSocketResponse) -> None:
    if call is not None:
        call.log.warning("the client reads too slowly (%d bytes waiting): closing", MAX_SEND_QUEUE_BYTES)
        call.metrics.ended("slow_reader")
    asyncio.ensure_future(ws.close(code=1008, message=b"slow_reader: the client does not read its events"))


def _append(call: Call, decoder: InputDecoder, policer: AudioPolicer, event: P.InputAudioAppend) -> None:
    data, fmt = event.audio, call.settings.input_format
    bytes_per_sample = 2 if fmt == "audio/pcm" else 1
    now_s = time.monotonic()
    if not policer.accept(now_s, len(data) / bytes_per_sample / wire_rate_hz(fmt)):
        call.guard.dropped(now_s)
        if call.guard.append_error_due(now_s):
            call.send(
                events.error_event(
                    "input_audio_too_fast",
                    f"appended audio is more than {MAX_AUDIO_AHEAD_S:g} s "
                    "ahead of real time: the excess is dropped",
                    event_id=event.event_id,
                )
            )
        return
    for chunk in decoder.push(data, fmt):
        call.hear(chunk)


async def _read_until_closed(
    ws: web.WebSocketResponse, call: Call, append: Callable[[P.InputAudioAppend], None]
) -> bool:
    """The socket's messages into the call until either ends. Appends skip the event-rate bucket (they
    are policed by audio time instead); everything else is an event as on the data channel. Returns
    whether the connection was lost (no normal closure from the client, and not its protocol error):
    then the call's conversation is parked for a resume."""
    closed = asyncio.ensure_future(call.closed.wait())
    try:
        while not ws.closed:
            pause_s = call.guard.read_pause_s(time.monotonic())
            if pause_s > 0:  # over budget: leave the socket unread (at most MAX_READ_PAUSE_S at a time)
                await asyncio.wait([closed], timeout=min(pause_s, MAX_READ_PAUSE_S))
                if closed.done():
                    return False
                continue
            receive = asyncio.ensure_future(ws.receive())
            done, _ = await asyncio.wait([receive, closed], return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                receive.cancel()
                return False
            msg = receive.result()
            if msg.type == WSMsgType.TEXT:
                _on_text(call, msg.data, append)
            elif msg.type == WSMsgType.BINARY:
                if _charged(call, time.monotonic(), len(msg.data)):
                    call.receive(bytes(msg.data))
            elif msg.type == WSMsgType.CLOSE:  # the client's close frame: 1000 ends the call
                return msg.data != WSCloseCode.OK
            elif msg.type == WSMsgType.CLOSING:  # we are closing it (a reader too slow)
                return False
            elif msg.type == WSMsgType.ERROR and isinstance(ws.exception(), WebSocketError):
                call.close_reason = f"websocket error: {ws.exception()!r}"  # a frame too big, bad framing
                return False
            else:  # the stream ended without a close frame, the connection failed, no pong in time
                return True
        return False  # closed by us while a message was handled
    finally:
        closed.cancel()


def _charged(call: Call, now_s: float, n_bytes: int) -> bool:
    """Every message takes from the call's message and byte budget before it is read (False: dropped)."""
    if call.guard.message_arrived(now_s, n_bytes):
        return True
    if call.guard.append_error_due(now_s):
        call.send(
            events.error_event(
                "rate_limited",
                f"more than {MAX_MESSAGES_PER_S:g} messages or {MAX_MESSAGE_BYTES_PER_S >> 10} KiB a "
                f"second: messages are being dropped unread ({call.guard.messages_dropped} so far)",
            )
        )
    return False


def _on_text(call: Call, text: str, append: Callable[[P.InputAudioAppend], None]) -> None:
    now_s = time.monotonic()
    if not _charged(call, now_s, len(text)):
        return
    if not _APPEND_TYPE.search(text):  # every other event: parsed once, by the call
        call.receive(text)
        return
    limits = call.config.limits
    try:
        event = P.parse_client_event(
            text,
            max_event_bytes=limits.max_event_bytes,
            max_text_chars=limits.max_text_chars,
            max_instructions_chars=limits.max_instructions_chars,
            max_audio_event_bytes=MAX_MESSAGE_BYTES,
        )
    except fields.ProtocolError as exc:
        if call.guard.append_error_due(now_s):  # one a second: a flood of bad appends gets no flood back
            call.send(events.error_event(exc.code, exc.message, event_id=exc.event_id, param=exc.param))
        return
    if isinstance(event, P.InputAudioAppend):
        append(event)
    else:  # the text names the append type elsewhere (inside a string, say): the call's path parses it
        call.receive(text)


async def _read_control(ws: web.WebSocketResponse, call: Call, writer: SocketWriter) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            call.receive(msg.data, only=CONTROL_EVENTS, answer=lambda e: writer.send(events.dumps(e)))

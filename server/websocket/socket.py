"""The Realtime WebSocket transport: `GET /v1/realtime` upgraded, the same events, session and engine as a
WebRTC call, with the audio in the events (`input_audio_buffer.append` in, `response.output_audio.delta`
out) in the session's format (server/audio/codecs.py). `?model=` is accepted and ignored.

A WebSocket call is a `Call` without a peer connection: the socket's text frames are its data channel,
a `DeltaSender` is its outbound track (each audio chunk goes out at once; the client plays it), and
appended audio goes through the same VAD and turns. Admission, auth, limits, timeouts and clean-up are
a WebRTC call's; what differs is said where it is done:

- auth: `Authorization: Bearer` or, for browsers (which cannot set headers on a WebSocket), the
  `openai-insecure-api-key.<key>` subprotocol beside `realtime`;
- barge-in cancels at speech start (server/call/call.py): the server cannot hear what the client played;
- liveness: the WebSocket's own ping (a peer that sends no audio is not gone);
- a client that reads too slowly is closed (code 1008) once `MAX_SEND_QUEUE_BYTES` wait for it;
- appended audio faster than real time (beyond `MAX_AUDIO_AHEAD_S`) is dropped with one error a second.

`GET /v1/realtime?call_id=rtc_...` with the API key is a control connection to a live WebRTC call: it
receives the call's events and may send `session.update`, `conversation.item.create`,
`response.create`, `response.cancel`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from collections.abc import Callable

import numpy as np
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from server.audio.codecs import InputDecoder, OutputEncoder, wire_rate_hz
from server.call.call import Call, new_call_id
from server.context import ServerContext
from server.edge.limits import ApiError, check_origin
from server.logs import current_call_id
from server.realtime import protocol as P
from server.webrtc.media import PlayoutStats
from server.webrtc.signalling import parse_session

log = logging.getLogger("glm4voice.websocket")
KEY_PROTOCOL_PREFIX = "openai-insecure-api-key."
MAX_MESSAGE_BYTES = 1 << 20  # one append: ~16 s of 24 kHz PCM in base64; anything larger is refused
MAX_SEND_QUEUE_BYTES = 8 << 20  # ~2 min of 24 kHz PCM deltas waiting for a slow reader: then it is closed
MAX_AUDIO_AHEAD_S = 10.0  # appended audio may run this far ahead of the wall clock (a client's buffer)
HEARTBEAT_S = 10.0  # WebSocket ping; no pong within half of it closes the connection
CONTROL_EVENTS = (P.SessionUpdate, P.ItemCreate, P.ResponseCreate, P.ResponseCancel)


class DeltaSender:
    """A WebSocket call's outbound "track" (the interface ReplyFlow drives): each chunk of a reply goes out
    at once as `response.output_audio.delta`; nothing plays out on the server, so a reply is active only
    while it is generating, and `clear()` returns how much audio was sent (the client reports what it
    played with conversation.item.truncate)."""

    def __init__(self) -> None:
        self.output_format: Callable[[], str] = lambda: "audio/pcm"  # the call's, bound once it exists
        self.emit: Callable[[str, bytes], None] = lambda response_id, data: None
        self.on_started: Callable[[str, float], None] | None = None
        self.on_stopped: Callable[[str], None] | None = None
        self.stats = PlayoutStats()
        self.queued_ms = 0.0
        self._reply_id: str | None = None
        self._encoder: OutputEncoder | None = None
        self._sent_ms = 0.0

    @property
    def active(self) -> bool:
        return self._reply_id is not None

    def begin_reply(self, reply_id: str) -> None:
        self._reply_id, self._sent_ms = reply_id, 0.0
        self._encoder = OutputEncoder(self.output_format())

    def push(self, pcm: np.ndarray, sample_rate_hz: int) -> None:
        if self._reply_id is None or self._encoder is None:
            return  # a late chunk of a cleared reply
        data = self._encoder.encode(pcm, sample_rate_hz)
        if self._sent_ms == 0.0 and pcm.size and self.on_started is not None:
            self.on_started(self._reply_id, time.monotonic())
        self._sent_ms += pcm.size * 1000.0 / sample_rate_hz
        if data:
            self.emit(self._reply_id, data)

    def end_reply(self) -> None:
        if self._reply_id is not None and self._encoder is not None:
            tail = self._encoder.flush()
            if tail:
                self.emit(self._reply_id, tail)
        self._reply_id = self._encoder = None

    def clear(self) -> float:
        self._reply_id = self._encoder = None
        return self._sent_ms

    def stop(self) -> None:
        self._reply_id = self._encoder = None


class SocketWriter:
    """Text frames to one WebSocket through a bounded queue: `send` never blocks the loop; a reader too
    slow for `MAX_SEND_QUEUE_BYTES` gets the connection closed with a reason instead of growing memory."""

    def __init__(self, ws: web.WebSocketResponse, on_overflow: Callable[[], None]) -> None:
        self._ws = ws
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._bytes = 0
        self._on_overflow = on_overflow
        self.overflowed = False

    def send(self, text: str) -> None:
        if self.overflowed or self._ws.closed:
            return
        if self._bytes + len(text) > MAX_SEND_QUEUE_BYTES:
            self.overflowed = True
            self._on_overflow()
            return
        self._bytes += len(text)
        self._queue.put_nowait(text)

    async def run(self) -> None:
        while (text := await self._queue.get()) is not None:
            self._bytes -= len(text)
            try:
                await self._ws.send_str(text)
            except ConnectionError:
                return

    def stop(self) -> None:
        self._queue.put_nowait(None)


class AudioPolicer:
    """Appended audio may not outrun the wall clock by more than MAX_AUDIO_AHEAD_S (real-time clients
    stay near 0; a file streamed at once is cut there)."""

    def __init__(self) -> None:
        self._start_s: float | None = None
        self._audio_s = 0.0
        self._last_error_s = -1.0

    def accept(self, now_s: float, duration_s: float) -> tuple[bool, bool]:
        """-> (keep the audio, send an error now)."""
        if self._start_s is None:
            self._start_s = now_s
        if self._audio_s + duration_s - (now_s - self._start_s) > MAX_AUDIO_AHEAD_S:
            complain = now_s - self._last_error_s >= 1.0
            self._last_error_s = now_s if complain else self._last_error_s
            return False, complain
        self._audio_s += duration_s
        return True, False


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
        try:
            if "call_id" in request.query:
                return await self._control(request)
            return await self._call(request)
        except ApiError as exc:
            self.ctx.metrics.reject(exc.code)
            raise

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
        """Admission exactly as an offer (server/webrtc/signalling.py), refused before the upgrade."""
        ctx, config = self.ctx, self.ctx.config
        check_origin(request, config)
        ctx.admission.check_rate(request)
        secret = ctx.auth.authorize_call(_with_subprotocol_key(request))
        ctx.admission.admit_call(request, ctx.occupied_slots(), ctx.ready(), ctx.not_ready_reason())
        settings = ctx.default_settings()
        if secret is not None and secret.session:
            settings = settings.apply(parse_session(secret.session, config))
        ws = await self._upgrade(request)
        call_id = new_call_id()
        current_call_id.set(call_id)
        sender = DeltaSender()
        call = Call(
            call_id, None, ctx.responder, ctx.vad, config, ctx.metrics, settings, ctx.forget, track=sender
        )
        sender.output_format = lambda: call.settings.output_format
        sender.emit = functools.partial(_send_delta, call)
        ctx.calls[call_id] = call
        ctx.metrics.calls_total += 1
        writer = SocketWriter(ws, lambda: _slow_reader(call, ws))
        writer_task = asyncio.get_running_loop().create_task(writer.run(), name=f"{call_id}:ws-writer")
        decoder, policer = InputDecoder(), AudioPolicer()
        call.audio_in = lambda data: _append(call, decoder, policer, data)
        call.connected()
        call.attach_sink(writer.send)
        try:
            await _read_until_closed(ws, call)
        finally:
            await call.close(call.close_reason or "websocket closed")
            writer.stop()
            await asyncio.wait([writer_task], timeout=1.0)
            writer_task.cancel()
            await ws.close()
        return ws

    async def _control(self, request: web.Request) -> web.StreamResponse:
        """A server-side app steering a live WebRTC call: the API key only (never a client secret)."""
        ctx = self.ctx
        check_origin(request, ctx.config)
        secret = ctx.auth.authorize_call(_with_subprotocol_key(request))
        if secret is not None:
            raise ApiError(
                403, "api_key_required", "a control connection needs the API key, not a client secret"
            )
        call = ctx.calls.get(request.query["call_id"])
        if call is None or call.pc is None:
            raise ApiError(404, "call_not_found", f"no active WebRTC call {request.query['call_id']!r}")
        ws = await self._upgrade(request)
        writer = SocketWriter(ws, lambda: asyncio.ensure_future(ws.close(code=1008, message=b"slow reader")))
        writer_task = asyncio.get_running_loop().create_task(
            writer.run(), name=f"{call.call_id}:control-writer"
        )
        call.observers.append(writer.send)
        closed = asyncio.ensure_future(call.closed.wait())
        try:
            reader = asyncio.ensure_future(_read_control(ws, call, writer))
            await asyncio.wait([reader, closed], return_when=asyncio.FIRST_COMPLETED)
            reader.cancel()
        finally:
            closed.cancel()
            if writer.send in call.observers:
                call.observers.remove(writer.send)
            writer.stop()
            await asyncio.wait([writer_task], timeout=1.0)
            writer_task.cancel()
            await ws.close()
        return ws


def _send_delta(call: Call, response_id: str, data: bytes) -> None:
    reply = call.replies.current
    item_id = reply.item_id if reply is not None and reply.response_id == response_id else None
    call.send(
        P.event(
            "response.output_audio.delta",
            response_id=response_id,
            item_id=item_id,
            output_index=0,
            content_index=0,
            delta=base64.b64encode(data).decode("ascii"),
        )
    )


def _slow_reader(call: Call, ws: web.WebSocketResponse) -> None:
    call.log.warning("the client reads too slowly (%d bytes waiting): closing", MAX_SEND_QUEUE_BYTES)
    call.metrics.ended("slow_reader")
    asyncio.ensure_future(ws.close(code=1008, message=b"slow_reader: the client does not read its events"))


def _append(call: Call, decoder: InputDecoder, policer: AudioPolicer, data: bytes) -> None:
    fmt = call.settings.input_format
    bytes_per_sample = 2 if fmt == "audio/pcm" else 1
    keep, complain = policer.accept(time.monotonic(), len(data) / bytes_per_sample / wire_rate_hz(fmt))
    if not keep:
        if complain:
            call.send(
                P.error_event(
                    "input_audio_too_fast",
                    f"appended audio is more than {MAX_AUDIO_AHEAD_S:g} s "
                    "ahead of real time: the excess is dropped",
                )
            )
        return
    for chunk in decoder.push(data, fmt):
        call.listening.feed_chunk(chunk)


async def _read_until_closed(ws: web.WebSocketResponse, call: Call) -> None:
    """The socket's messages into the call until either ends. Appends skip the event-rate bucket (they
    are policed by audio time instead); everything else is an event as on the data channel."""
    closed = asyncio.ensure_future(call.closed.wait())
    try:
        while not ws.closed:
            receive = asyncio.ensure_future(ws.receive())
            done, _ = await asyncio.wait([receive, closed], return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                receive.cancel()
                return
            msg = receive.result()
            if msg.type == WSMsgType.TEXT:
                _on_text(call, msg.data)
            elif msg.type == WSMsgType.BINARY:
                call._on_message(bytes(msg.data))
            elif msg.type == WSMsgType.ERROR:  # a frame over MAX_MESSAGE_BYTES, a protocol violation
                call.close_reason = f"websocket error: {ws.exception()!r}"
                return
            else:  # CLOSE / CLOSING / CLOSED
                return
    finally:
        closed.cancel()


def _on_text(call: Call, text: str) -> None:
    try:
        kind = json.loads(text).get("type") if text.lstrip().startswith("{") else None
    except (ValueError, RecursionError):
        kind = None
    if kind != "input_audio_buffer.append":
        call._on_message(text)
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
        call.handle_event(event)
    except P.ProtocolError as exc:
        call.send(P.error_event(exc.code, exc.message, event_id=exc.event_id, param=exc.param))


async def _read_control(ws: web.WebSocketResponse, call: Call, writer: SocketWriter) -> None:
    limits = call.config.limits
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            continue
        try:
            event = P.parse_client_event(
                msg.data,
                max_event_bytes=limits.max_event_bytes,
                max_text_chars=limits.max_text_chars,
                max_instructions_chars=limits.max_instructions_chars,
            )
            if not isinstance(event, CONTROL_EVENTS):
                raise P.ProtocolError(
                    "unsupported_value",
                    "a control connection may send session.update, "
                    "conversation.item.create, response.create and response.cancel",
                    event.event_id,
                    "type",
                )
            call.handle_event(event)
        except P.ProtocolError as exc:
            writer.send(P.dumps(P.error_event(exc.code, exc.message, event_id=exc.event_id, param=exc.param)))

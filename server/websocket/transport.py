"""The WebSocket transport of a call: its events are the socket's text frames, the assistant's audio
goes out in them at once (`response.output_audio.delta`, in the session's format, server/audio/codecs.py)
and the client plays it on its own clock; the user's audio comes in `input_audio_buffer.append`
(server/websocket/socket.py reads it).

Built by server/websocket/socket.py, which binds it to its call (`bind`) once the call exists.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import web

from server.audio.codecs import OutputEncoder
from server.call.transport import PlayoutStats
from server.realtime import events

if TYPE_CHECKING:
    from server.call.call import Call

MAX_SEND_QUEUE_BYTES = 8 << 20  # ~2 min of 24 kHz PCM deltas waiting for a slow reader: then it is closed


class DeltaSender:
    """A WebSocket call's `AudioOut` (server/call/transport.py): each chunk of a reply goes out at once as
    `response.output_audio.delta`; nothing plays out on the server, so a reply holds audio only while it
    is generating, `clear()` returns how much audio was sent (the client reports what it played with
    conversation.item.truncate), and no frame is ever reported to `on_frame`."""

    def __init__(self) -> None:
        self.output_format: Callable[[], str] = lambda: "audio/pcm"  # the call's, bound once it exists
        self.emit: Callable[[str, bytes], None] = lambda response_id, data: None
        self.on_started: Callable[[str, float], None] | None = None
        self.on_stopped: Callable[[str], None] | None = None
        self.on_frame: Callable[[np.ndarray], None] | None = None
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
        self._drained = asyncio.Event()  # set while nothing waits to be sent
        self._drained.set()
        self.overflowed = False

    def send(self, text: str) -> None:
        if self.overflowed or self._ws.closed:
            return
        if self._bytes + len(text) > MAX_SEND_QUEUE_BYTES:
            self.overflowed = True
            self._on_overflow()
            return
        self._bytes += len(text)
        self._drained.clear()
        self._queue.put_nowait(text)

    async def run(self) -> None:
        while (text := await self._queue.get()) is not None:
            self._bytes -= len(text)
            try:
                await self._ws.send_str(text)
            except ConnectionError:
                return
            if self._queue.empty():
                self._drained.set()

    async def drained(self, timeout_s: float) -> None:
        """Until every text sent so far is written to the socket, at most `timeout_s`."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except TimeoutError:
            pass

    def stop(self) -> None:
        self._queue.put_nowait(None)


class WebSocketTransport:
    plays_out = False  # the client plays the deltas; the server cannot know what it has heard
    resumable = True  # a socket lost without a normal closure parks the conversation (socket.py)

    def __init__(self, writer: SocketWriter) -> None:
        self.audio = DeltaSender()
        self._writer = writer

    def bind(self, call: Call) -> None:
        """The call this transport carries: its output format, its events for the audio deltas."""
        self.audio.output_format = lambda: call.settings.output_format
        self.audio.emit = lambda response_id, data: _send_delta(call, response_id, data)

    def send(self, text: str) -> None:
        self._writer.send(text)

    async def flush(self, timeout_s: float) -> None:
        await self._writer.drained(timeout_s)

    async def close(self) -> None:
        """What was sent still goes out; the socket's handler closes the socket when its call is closed."""
        self._writer.stop()


def _send_delta(call: Call, response_id: str, data: bytes) -> None:
    reply = call.replies.current
    item_id = reply.item_id if reply is not None and reply.response_id == response_id else None
    call.send(
        events.event(
            "response.output_audio.delta",
            response_id=response_id,
            item_id=item_id,
            output_index=0,
            content_index=0,
            delta=base64.b64encode(data).decode("ascii"),
        )
    )

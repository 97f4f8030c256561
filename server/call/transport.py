"""What a call needs of its transport: the seam between `Call` and WebRTC or WebSocket.

A `Call` (server/call/call.py) is built with one `Transport` and never asks which one it has. A
transport carries the call's server events to the client (`send`), takes the assistant's audio
(`audio`: begin a reply, push PCM, flush, clear on barge-in, how much was played), says whether that
audio plays out on a real-time clock we control (`plays_out`) and whether a dropped connection may be
resumed (`resumable`), and lets go of its connection (`close`). The other direction - client events,
user audio, "connected", "gone" - is the transport calling the call's public methods (`Call.receive`,
`Call.hear`, `Call.audio_arrived`, `Call.connected`, `Call.close`).

Implementations: server/webrtc/transport.py (a data channel and a paced 48 kHz track) and
server/websocket/transport.py (text frames, audio as `response.output_audio.delta`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class PlayoutStats:
    underruns: int = 0  # frames that went out (partly) silent while a reply was still arriving


class AudioOut(Protocol):
    """The assistant's audio on its way to the client, one reply at a time.

    `begin_reply(id)`, `push(pcm, rate)`* at any rate, `end_reply()` (flush: no more audio for it).
    `clear()` drops what is queued (barge-in) and returns the ms of the reply that went out.
    `on_started(reply_id, t_s)` fires when the reply's first audio leaves, `on_stopped(reply_id)` when
    the last has played out; `on_frame(pcm)` sees each frame as it leaves (the echo guard's reference).
    """

    on_started: Callable[[str, float], None] | None
    on_stopped: Callable[[str], None] | None
    on_frame: Callable[[np.ndarray], None] | None
    stats: PlayoutStats

    @property
    def active(self) -> bool:
        """A reply is queued or still arriving."""
        ...

    @property
    def queued_ms(self) -> float:
        """Audio waiting to go out."""
        ...

    def begin_reply(self, reply_id: str) -> None: ...

    def push(self, pcm: np.ndarray, sample_rate_hz: int) -> None:
        """(n,) float32 mono at `sample_rate_hz`."""
        ...

    def end_reply(self) -> None: ...

    def clear(self) -> float: ...

    def stop(self) -> None:
        """The call is closing: nothing more goes out."""
        ...


class Transport(Protocol):
    audio: AudioOut
    # The server paces the audio out on its own clock, so it knows what the client has heard: it sends
    # `output_audio_buffer.*`, guards against its own echo and waits `min_interrupt_ms` before a barge-in.
    # Otherwise the client plays the audio: a barge-in cancels at speech start and the client reports
    # what it played (conversation.item.truncate), as the Realtime API asks of WebSocket clients.
    plays_out: bool
    # A dropped connection parks the call's conversation for a resume (server/call/resume.py).
    resumable: bool

    def send(self, text: str) -> None:
        """One server event, serialised; never blocks (a transport that is not open yet queues it)."""
        ...

    async def flush(self, timeout_s: float) -> None:
        """Wait, at most `timeout_s`, until the events sent so far are on their way."""
        ...

    async def close(self) -> None:
        """Let go of the connection; never raises, bounded in time."""
        ...

"""One WebRTC connection to the server: the peer connection, the `oai-events` data channel, the outbound
audio track and the inbound audio reader. The call (client/call.py) makes a new one for each reconnect.

It reports through three callbacks: each server event, each received 20 ms frame, and, once, that the
connection was lost (with why) unless the call closed it itself.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import Callable

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from client import signalling
from client.audio_io import FRAME_SAMPLES, WIRE_RATE_HZ, AudioSource
from client.errors import NetworkError

CONNECT_TIMEOUT_S = 15.0  # ICE + DTLS + the data channel opening, on any network worth calling over
AUDIO_SILENCE_TIMEOUT_S = (
    3.0  # the server sends a frame every 20 ms, silence included: 3 s without one is a loss
)


class OutboundAudio(MediaStreamTrack):
    """The microphone track: a 20 ms frame every 20 ms on a monotonic clock. `sending()` decides per frame
    whether the source's audio goes out or silence does (push-to-talk released, half-duplex playback);
    the source is read either way, so a muted stretch of a file or a microphone is dropped, not delayed."""

    kind = "audio"

    def __init__(self, source: AudioSource, sending: Callable[[], bool]) -> None:
        super().__init__()
        self._source = source
        self._sending = sending
        self._start_s: float | None = None
        self._index = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start_s is None:
            self._start_s = now
        else:
            self._index += 1
            due = self._start_s + self._index * FRAME_SAMPLES / WIRE_RATE_HZ
            if due > now:
                await asyncio.sleep(due - now)  # pacing: a frame is due every 20 ms
        pcm = self._source.pull(FRAME_SAMPLES)  # (960,)
        if not self._sending():
            pcm = np.zeros(FRAME_SAMPLES, np.float32)
        samples = (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16).reshape(1, FRAME_SAMPLES)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = WIRE_RATE_HZ
        frame.pts = self._index * FRAME_SAMPLES
        frame.time_base = fractions.Fraction(1, WIRE_RATE_HZ)
        return frame


class Connection:
    def __init__(
        self,
        track: OutboundAudio,
        on_event: Callable[[dict], None],
        on_audio: Callable[[np.ndarray], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self._track = track
        self._on_event = on_event
        self._on_audio = on_audio
        self._on_lost = on_lost
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self.pc: RTCPeerConnection | None = None
        self.answer: signalling.Answer | None = None

    async def open(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        server_session: dict,
        session: dict,
        token: str | None,
        resume_token: str | None,
    ) -> signalling.Answer:
        """Offer, answer, and wait until media and the data channel are up. Raises client.errors."""
        pc = self.pc = RTCPeerConnection(signalling.rtc_configuration(server_session))
        pc.addTrack(self._track)
        channel = self.channel = pc.createDataChannel("oai-events")
        opened = asyncio.Event()
        channel.on("open", opened.set)
        channel.on("message", self._message)
        channel.on("close", lambda: self._lost("the data channel closed"))

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._lost(f"the connection {pc.connectionState}")

        @pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._receive(track)))

        await pc.setLocalDescription(
            await pc.createOffer()
        )  # aiortc gathers every candidate here: no trickle
        endpoint = server_session.get("calls_endpoint") or "/v1/realtime/calls"
        self.answer = await signalling.post_offer(
            http, base_url, endpoint, pc.localDescription.sdp, session, token, resume_token
        )
        await pc.setRemoteDescription(RTCSessionDescription(sdp=self.answer.sdp, type="answer"))
        try:
            await asyncio.wait_for(opened.wait(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise NetworkError(
                f"no media path to {base_url} within {CONNECT_TIMEOUT_S:.0f} s (ICE "
                f"{pc.iceConnectionState}); a TURN server may be needed"
            ) from None
        return self.answer

    def send(self, event: dict) -> None:
        if getattr(self, "channel", None) is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps(event))

    def _message(self, message: str | bytes) -> None:
        try:
            event = json.loads(message)
        except ValueError:
            return
        if isinstance(event, dict):
            self._on_event(event)

    async def _receive(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await asyncio.wait_for(track.recv(), AUDIO_SILENCE_TIMEOUT_S)
            except MediaStreamError:
                return self._lost("the server's audio track ended")
            except TimeoutError:
                return self._lost(f"no audio from the server for {AUDIO_SILENCE_TIMEOUT_S:.0f} s")
            channels = len(frame.layout.channels)
            pcm = frame.to_ndarray().reshape(-1, channels).mean(axis=1) / 32768.0  # (samples,) at 48 kHz
            self._on_audio(pcm.astype(np.float32))

    def _lost(self, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self._on_lost(reason)

    async def close(self, http: aiohttp.ClientSession | None, base_url: str) -> None:
        """Hang up (when `http` is given and the call was answered) and release everything."""
        self._closing = True
        if http is not None and self.answer is not None:
            await signalling.hangup(http, base_url, self.answer.location)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pc is not None:
            await self.pc.close()

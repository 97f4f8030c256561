"""PCM at the WebRTC edge: inbound frames -> 16 kHz mono chunks; replies -> a paced 48 kHz outbound track.

Frame contract (pipeline/audio_format.py): aiortc hands us packed s16 stereo 48 kHz frames of 960
samples (20 ms); the VAD and the responder take 16 kHz mono float32; the responder answers at its own
rate (22.05 kHz from the GLM-4-Voice vocoder, 16 kHz from the echo) and the outbound track resamples to
48 kHz.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque
from collections.abc import Callable

import av
import numpy as np
import soxr
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from server.audio.codecs import RESAMPLE_QUALITY
from server.audio.vad import CHUNK_SAMPLES, SAMPLE_RATE_HZ
from server.call.transport import PlayoutStats

OUT_RATE_HZ = 48_000  # Opus / WebRTC rate
FRAME_SAMPLES = 960  # 20 ms at 48 kHz: one outbound frame
FRAME_S = FRAME_SAMPLES / OUT_RATE_HZ
MAX_LAG_FRAMES = 10  # after a stall longer than this, restart the clock instead of bursting frames
_TIME_BASE = fractions.Fraction(1, OUT_RATE_HZ)
_SILENCE = np.zeros((1, FRAME_SAMPLES), np.int16)  # av copies it into each frame


def frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Any av audio frame -> (samples,) float32 mono in [-1, 1] at the frame's own rate."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if data.dtype == np.int16 and channels == 2 and not frame.format.is_planar:  # what aiortc hands us
        pairs = data.reshape(-1, 2).astype(np.float32)  # (N, 2)
        return (pairs[:, 0] + pairs[:, 1]) * np.float32(0.5 / 32768.0)
    if frame.format.is_planar:
        samples = data.reshape(channels, -1)  # (C, N)
    else:
        samples = data.reshape(-1, channels).T  # packed (1, N*C) -> (C, N)
    mono = samples.mean(axis=0) if channels > 1 else samples[0]
    if data.dtype == np.int16:
        return (mono / 32768.0).astype(np.float32)
    return mono.astype(np.float32)


class InboundConverter:
    """48 kHz frames in, 512-sample 16 kHz chunks out (the VAD's unit). One per call; `reset()` at hangup."""

    def __init__(self) -> None:
        self._resampler: soxr.ResampleStream | None = None
        self._rate_hz = 0
        self._pending = np.zeros(0, np.float32)

    def reset(self) -> None:
        self._resampler = None
        self._rate_hz = 0
        self._pending = np.zeros(0, np.float32)

    def push(self, frame: av.AudioFrame) -> list[np.ndarray]:
        mono = frame_to_mono(frame)
        if frame.sample_rate != self._rate_hz:
            self._rate_hz = frame.sample_rate
            self._resampler = soxr.ResampleStream(
                frame.sample_rate, SAMPLE_RATE_HZ, 1, dtype="float32", quality=RESAMPLE_QUALITY
            )
        assert self._resampler is not None
        pcm16k = self._resampler.resample_chunk(mono)
        pending = np.concatenate([self._pending, pcm16k]) if self._pending.size else pcm16k
        n_chunks = pending.size // CHUNK_SAMPLES
        chunks = [pending[i * CHUNK_SAMPLES : (i + 1) * CHUNK_SAMPLES] for i in range(n_chunks)]
        self._pending = pending[n_chunks * CHUNK_SAMPLES :].copy()
        return chunks


class OutboundAudioTrack(MediaStreamTrack):
    """The call's one outbound track (its `AudioOut`, server/call/transport.py): a 20 ms frame every
    20 ms on a monotonic clock, silence when idle.

    A reply is `begin_reply()`, `push()`* at any rate, `end_reply()`. `clear()` drops everything queued
    (the next frame is silence) and returns how much of the reply went out. `on_started(reply_id, t)` fires
    when the reply's first frame leaves, `on_stopped(reply_id)` when the last one has; both on the loop.
    """

    kind = "audio"

    def __init__(
        self,
        on_started: Callable[[str, float], None] | None = None,
        on_stopped: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.on_frame: Callable[[np.ndarray], None] | None = None  # each (960,) frame as it leaves
        self.stats = PlayoutStats()
        self._queue: deque[np.ndarray] = deque()  # (n,) float32 at 48 kHz
        self._queued_samples = 0
        self._resampler: soxr.ResampleStream | None = None
        self._resampler_rate_hz = 0
        self._reply_id: str | None = None
        self._reply_ended = True
        self._reply_started = False
        self._played_samples = 0
        self._clock_start: float | None = None
        self._frame_index = 0

    # ----- reply side (called by the call's turn task) ---------------------------------------------

    @property
    def active(self) -> bool:
        """A reply is queued or still arriving."""
        return self._reply_id is not None

    @property
    def queued_ms(self) -> float:
        """Audio waiting to go out (what a reader of the track still has to pull)."""
        return self._queued_samples * 1000.0 / OUT_RATE_HZ

    @property
    def played_ms(self) -> float:
        return self._played_samples * 1000.0 / OUT_RATE_HZ

    def begin_reply(self, reply_id: str) -> None:
        self._drop()
        self._reply_id = reply_id
        self._reply_ended = False
        self._reply_started = False
        self._played_samples = 0

    def push(self, pcm: np.ndarray, sample_rate_hz: int) -> None:
        if self._reply_id is None or self._reply_ended:
            return  # a late chunk of a cleared reply
        if sample_rate_hz != OUT_RATE_HZ:
            if self._resampler is None or sample_rate_hz != self._resampler_rate_hz:
                self._flush_resampler()
                self._resampler = soxr.ResampleStream(
                    sample_rate_hz, OUT_RATE_HZ, 1, dtype="float32", quality=RESAMPLE_QUALITY
                )
                self._resampler_rate_hz = sample_rate_hz
            pcm = self._resampler.resample_chunk(pcm.astype(np.float32, copy=False))
        else:
            self._flush_resampler()
        self._enqueue(pcm.astype(np.float32, copy=False))

    def end_reply(self) -> None:
        """No more audio for this reply; `on_stopped` fires once the queue has played out."""
        self._flush_resampler()
        self._reply_ended = True
        if not self._reply_started and self._queued_samples == 0:
            self._reply_id = None  # a reply without audio: nothing will play, nothing to wait for

    def clear(self) -> float:
        """Barge-in: drop the queue now. Returns ms of the reply that went out."""
        played_ms = self.played_ms
        self._drop()
        self._reply_id = None
        self._reply_ended = True
        return played_ms

    def _enqueue(self, pcm: np.ndarray) -> None:
        if pcm.size:
            self._queue.append(pcm)
            self._queued_samples += pcm.size

    def _flush_resampler(self) -> None:
        if self._resampler is not None:
            self._enqueue(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
            self._resampler = None
            self._resampler_rate_hz = 0

    def _drop(self) -> None:
        self._queue.clear()
        self._queued_samples = 0
        self._resampler = None
        self._resampler_rate_hz = 0

    def _take(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        filled = 0
        while filled < n and self._queue:
            head = self._queue[0]
            take = min(n - filled, head.size)
            out[filled : filled + take] = head[:take]
            filled += take
            if take == head.size:
                self._queue.popleft()
            else:
                self._queue[0] = head[take:]
        self._queued_samples -= filled
        if self._reply_id is not None:
            self._played_samples += filled
            if filled < n and not self._reply_ended and self._reply_started:
                self.stats.underruns += 1
        return out

    # ----- the paced sender side (aiortc's RTCRtpSender awaits recv()) ------------------------------

    async def _pace(self) -> None:
        now = time.monotonic()
        if self._clock_start is None:
            self._clock_start = now
            return
        self._frame_index += 1
        due = self._clock_start + self._frame_index * FRAME_S
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > MAX_LAG_FRAMES * FRAME_S:
            self._clock_start = now - self._frame_index * FRAME_S

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pace()
        had_audio = self._queued_samples > 0
        pcm = self._take(FRAME_SAMPLES)
        reply_id = self._reply_id
        if reply_id is not None and had_audio and not self._reply_started:
            self._reply_started = True
            if self.on_started:
                self.on_started(reply_id, time.monotonic())
        if reply_id is not None and self._reply_ended and self._queued_samples == 0:
            self._reply_id = None
            if self._reply_started and self.on_stopped:
                self.on_stopped(reply_id)
        if self.on_frame is not None:
            self.on_frame(pcm)
        if had_audio:
            samples = (
                (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16).reshape(1, FRAME_SAMPLES)
            )  # (1, 960)
        else:
            samples = _SILENCE
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = OUT_RATE_HZ
        frame.pts = self._frame_index * FRAME_SAMPLES
        frame.time_base = _TIME_BASE
        return frame

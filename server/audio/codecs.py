"""Audio of the WebSocket transport: Realtime's `audio/pcm` (16-bit LE mono, 24 kHz), `audio/pcmu` and
`audio/pcma` (G.711 mu-law / A-law, 8 kHz: what telephony media streams carry) to and from the PCM the
call works in (16 kHz float32 in, the responder's rate out).

G.711 by table: the ITU-T G.711 segment rules (as in Sun's reference g711.c) evaluated once for all
256 codes (decode) and all 65 536 16-bit values (encode).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import soxr

from server.audio.vad import CHUNK_SAMPLES, SAMPLE_RATE_HZ
from server.realtime.session_update import PCM_RATE_HZ

G711_RATE_HZ = 8_000

# soxr "LQ" is 16-bit precision (what Opus carries) and holds back ~6 ms at 48->16 kHz and <1 ms at
# 22.05->48 kHz; "HQ" holds 21 ms and 33 ms, latency added to every turn end and every reply start.
RESAMPLE_QUALITY = "LQ"


def wire_rate_hz(fmt: str) -> int:
    return PCM_RATE_HZ if fmt == "audio/pcm" else G711_RATE_HZ


def _ulaw_encode_one(pcm: int) -> int:
    value = pcm >> 2  # 14-bit
    mask = 0xFF
    if value < 0:
        value, mask = -value, 0x7F
    value = min(value, 8159) + 33  # clip, then the bias (0x84 >> 2)
    segment = max(value.bit_length() - 6, 0)  # segment ends 0x3F, 0x7F, ... 0x1FFF
    if segment >= 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask


def _ulaw_decode_one(code: int) -> int:
    code = ~code & 0xFF
    t = (((code & 0x0F) << 3) + 0x84) << ((code & 0x70) >> 4)
    return 0x84 - t if code & 0x80 else t - 0x84


def _alaw_encode_one(pcm: int) -> int:
    value = pcm >> 3  # 13-bit
    mask = 0xD5
    if value < 0:
        value, mask = -value - 1, 0x55
    segment = max(value.bit_length() - 5, 0)  # segment ends 0x1F, 0x3F, ... 0xFFF
    if segment >= 8:
        return 0x7F ^ mask
    low = (value >> 1) & 0x0F if segment < 2 else (value >> segment) & 0x0F
    return ((segment << 4) | low) ^ mask


def _alaw_decode_one(code: int) -> int:
    code ^= 0x55
    t = (code & 0x0F) << 4
    segment = (code & 0x70) >> 4
    if segment == 0:
        t += 8
    else:
        t = (t + 0x108) << (segment - 1)
    return t if code & 0x80 else -t


@cache
def _tables(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (decode (256,) int16, encode (65536,) uint8 indexed by the int16 value + 32768)."""
    encode_one, decode_one = {
        "audio/pcmu": (_ulaw_encode_one, _ulaw_decode_one),
        "audio/pcma": (_alaw_encode_one, _alaw_decode_one),
    }[fmt]
    decode = np.array([decode_one(c) for c in range(256)], np.int16)
    encode = np.array([encode_one(v) for v in range(-32768, 32768)], np.uint8)
    return decode, encode


def decode_wire(data: bytes, fmt: str) -> np.ndarray:
    """Wire bytes (whole samples) -> (n,) float32 in [-1, 1] at `wire_rate_hz(fmt)`."""
    if fmt == "audio/pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    return _tables(fmt)[0][np.frombuffer(data, np.uint8)].astype(np.float32) / 32768.0


def encode_wire(pcm: np.ndarray, fmt: str) -> bytes:
    """(n,) float32 at `wire_rate_hz(fmt)` -> wire bytes."""
    samples = (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)
    if fmt == "audio/pcm":
        return samples.astype("<i2").tobytes()
    return _tables(fmt)[1][samples.astype(np.int32) + 32768].tobytes()


class InputDecoder:
    """Appended wire audio -> the call's 512-sample 16 kHz chunks (the VAD's unit). One per call."""

    def __init__(self) -> None:
        self._fmt = ""
        self._resampler: soxr.ResampleStream | None = None
        self._odd = b""  # a PCM sample split across two appends
        self._pending = np.zeros(0, np.float32)

    def push(self, data: bytes, fmt: str) -> list[np.ndarray]:
        if fmt != self._fmt:  # the session's format changed: start clean
            self._fmt, self._odd = fmt, b""
            self._resampler = soxr.ResampleStream(
                wire_rate_hz(fmt), SAMPLE_RATE_HZ, 1, dtype="float32", quality=RESAMPLE_QUALITY
            )
        assert self._resampler is not None
        if fmt == "audio/pcm":
            data = self._odd + data
            whole = len(data) - len(data) % 2
            data, self._odd = data[:whole], data[whole:]
        pcm16k = self._resampler.resample_chunk(decode_wire(data, fmt))
        pending = np.concatenate([self._pending, pcm16k]) if self._pending.size else pcm16k
        n_chunks = pending.size // CHUNK_SAMPLES
        self._pending = pending[n_chunks * CHUNK_SAMPLES :].copy()
        return [pending[i * CHUNK_SAMPLES : (i + 1) * CHUNK_SAMPLES] for i in range(n_chunks)]


class OutputEncoder:
    """One reply's audio at the responder's rate -> wire bytes in the session's output format."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._resampler: soxr.ResampleStream | None = None
        self._rate_hz = 0

    def encode(self, pcm: np.ndarray, rate_hz: int) -> bytes:
        if rate_hz != self._rate_hz:
            tail = self.flush()
            self._rate_hz = rate_hz
            self._resampler = soxr.ResampleStream(
                rate_hz, wire_rate_hz(self.fmt), 1, dtype="float32", quality=RESAMPLE_QUALITY
            )
        else:
            tail = b""
        assert self._resampler is not None
        return tail + encode_wire(
            self._resampler.resample_chunk(pcm.astype(np.float32, copy=False)), self.fmt
        )

    def flush(self) -> bytes:
        if self._resampler is None:
            return b""
        out = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        self._resampler, self._rate_hz = None, 0
        return encode_wire(out, self.fmt)

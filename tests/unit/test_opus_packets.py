"""Opus packet durations from the TOC byte, and the jitter buffer that polices packets before decoding
(server/webrtc/packets.py, server/webrtc/rtc.py)."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
from aiortc.codecs.opus import OpusEncoder
from aiortc.rtp import RtpPacket

from server.webrtc.packets import MAX_PACKET_S, MIN_PACKET_S, opus_duration_s
from server.webrtc.rtc import InOrderAudioJitterBuffer, PolicedJitterBuffer


def _toc(config: int, code: int) -> int:
    return config << 3 | code


@pytest.mark.parametrize(
    ("payload", "seconds"),
    [
        (bytes([_toc(1, 0), 0]), 0.020),  # SILK NB 20 ms, one frame
        (bytes([_toc(3, 0), 0]), 0.060),  # SILK NB 60 ms
        (bytes([_toc(13, 1), 0]), 0.040),  # hybrid SWB 20 ms, two frames (code 1)
        (bytes([_toc(28, 2), 0]), 0.005),  # CELT FB 2.5 ms, two frames of different sizes (code 2)
        (bytes([_toc(31, 3), 5]), 0.100),  # CELT FB 20 ms, code 3 with 5 frames
        (bytes([_toc(31, 3), 0]), MIN_PACKET_S),  # code 3 naming no frame: malformed
        (bytes([_toc(3, 3), 48]), MAX_PACKET_S),  # 48 x 60 ms: past what RFC 6716 allows
        (b"", MIN_PACKET_S),
    ],
)
def test_opus_duration_from_the_toc(payload: bytes, seconds: float) -> None:
    assert opus_duration_s(payload) == pytest.approx(seconds)


def test_what_aiortcs_encoder_sends_is_read_as_20_ms() -> None:
    encoder = OpusEncoder()
    durations = []
    for i in range(5):
        frame = av.AudioFrame.from_ndarray(
            (np.random.default_rng(i).standard_normal((1, 960)) * 3000).astype(np.int16),
            format="s16",
            layout="mono",
        )
        frame.sample_rate, frame.pts, frame.time_base = 48_000, i * 960, fractions.Fraction(1, 48_000)
        payloads, _ = encoder.encode(frame)
        durations += [opus_duration_s(p) for p in payloads]
    assert durations and all(d == pytest.approx(0.020) for d in durations)


def _packet(seq: int, payload_type: int = 111) -> RtpPacket:
    packet = RtpPacket(payload_type=payload_type, sequence_number=seq, timestamp=seq * 960)
    packet.payload = bytes([_toc(1, 0), 0])
    packet._data = packet.payload  # what aiortc's receiver sets before the jitter buffer
    return packet


@pytest.mark.parametrize("in_order", [True, False], ids=["in-order", "aiortc-buffer"])
def test_packets_over_the_budget_are_dropped_before_release(in_order: bool) -> None:
    charged: list[float] = []
    budget = 3

    def charge(duration_s: float) -> bool:
        charged.append(duration_s)
        return len(charged) <= budget

    buffer = (
        InOrderAudioJitterBuffer(charge, frozenset({111}))
        if in_order
        else PolicedJitterBuffer(charge, frozenset({111}), capacity=16, prefetch=0)
    )
    released = [buffer.add(_packet(seq)) for seq in range(6)]
    assert charged == pytest.approx([0.02] * 6)
    if in_order:
        assert [frame is not None for _, frame in released] == [True] * budget + [False] * 3
    buffer.add(_packet(6, payload_type=0))
    assert len(charged) == 6  # another codec's packet is not charged here: its frames are, when decoded

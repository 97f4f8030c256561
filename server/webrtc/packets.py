"""Inbound audio policed per RTP packet, before aiortc decodes it.

A client that sends Opus faster than real time used to cost us every packet's decode (aiortc's decoder
thread, a PyAV frame, our resampler) before the frame-level check dropped the excess. The receive jitter
buffer (server/webrtc/rtc.py) now charges each Opus packet's duration against the call's real-time
budget (`Call.audio_arrived`, the same check and the same `input_audio_too_fast` / `inbound_flood`
outcome as before) and drops the excess undecoded. The duration is read from the packet's Opus TOC
byte (RFC 6716, section 3.1): the frame size its configuration names times the frame count its code
names. Packets of other payload types (a G.711 the offer negotiated first) are decoded and charged
per frame as before (server/webrtc/transport.py).
"""

from __future__ import annotations

OPUS_RATE_HZ = 48_000  # what aiortc's Opus decoder outputs: a frame at this rate was charged as a packet
MIN_PACKET_S = 0.0025  # the shortest Opus frame: every packet costs at least this, empty or not
MAX_PACKET_S = 0.120  # the longest Opus packet RFC 6716 allows

# Frame size (ms) per TOC configuration 0..31: SILK NB/MB/WB 10-60 ms, hybrid SWB/FB 10-20 ms,
# CELT NB/WB/SWB/FB 2.5-20 ms.
_FRAME_MS = (
    (10.0, 20.0, 40.0, 60.0) * 3  # configs 0-11: SILK-only
    + (10.0, 20.0) * 2  # 12-15: hybrid
    + (2.5, 5.0, 10.0, 20.0) * 4  # 16-31: CELT-only
)


def opus_duration_s(payload: bytes) -> float:
    """The audio an Opus packet holds, in seconds, clamped to [MIN_PACKET_S, MAX_PACKET_S] (a malformed
    packet is charged as the shortest one: the decoder refuses it anyway)."""
    if not payload:
        return MIN_PACKET_S
    toc = payload[0]
    frame_ms, code = _FRAME_MS[toc >> 3], toc & 0x3
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        frames = payload[1] & 0x3F if len(payload) > 1 else 0
    return min(MAX_PACKET_S, max(MIN_PACKET_S, frames * frame_ms / 1000.0))

"""aiortc/aioice adjustments and SDP checks: everything here touches library internals, in one place.

1. Host candidates: aioice gathers from `aioice.ice.get_host_addresses`, which skips 127.0.0.1. We
   wrap that module function so `webrtc.host_addresses` picks exactly which addresses are offered
   (loopback included when asked for). It is process-wide, as aioice's function is.
2. Remote candidates on addresses we cannot reach from our host addresses (loopback vs. not) are
   dropped from the offer before aiortc sees them, so ICE does not spend checks on them; so are
   candidates past `webrtc.max_remote_candidates` per offer and `MAX_CANDIDATES_PER_ADDRESS` per IP:
   each remote candidate is a target our ICE agent sends STUN checks to, and an unauthenticated offer
   must not point us at a thousand ports of someone else's host.
3. The receive jitter buffer: aiortc releases an audio frame only when 4 newer packets are in
   (`JitterBuffer(capacity=16, prefetch=4)`), i.e. it holds 80 ms before the VAD sees anything. An
   Opus packet is always one whole frame, so with `receive_jitter_frames = 0` we release each packet
   as soon as it arrives in order; a packet that arrives after a later one was released is dropped
   (Opus copes with a lost 20 ms frame; reordering is rare on the paths WebRTC picks). N > 0 keeps
   aiortc's buffer with prefetch N. bench/bench_call_path.py measures both.
4. ICE consent checks: `webrtc.consent_interval_s` / `consent_failures` set aioice's module constants.
5. Data-channel text that is not UTF-8: aiortc decodes it inside its SCTP receive path, where the
   `UnicodeDecodeError` would end the association (the call). We hand such a message to the channel's
   listeners as `protocol.NotUtf8Text` (bytes) instead, so the call answers it with an `error` event.
   Installed on import, process-wide.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

import aioice.ice
from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcsctptransport import WEBRTC_STRING, RTCSctpTransport
from aiortc.rtp import RtpPacket

from server.realtime.fields import NotUtf8Text
from server.webrtc.packets import opus_duration_s

Charge = Callable[[float], bool]  # audio of that many seconds arrived: False to drop it (over real time)

_default_get_host_addresses = aioice.ice.get_host_addresses
_allowed_host_addresses: tuple[str, ...] = ()


def _configured_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    if not _allowed_host_addresses:
        return _default_get_host_addresses(use_ipv4, use_ipv6)
    out = []
    for address in _allowed_host_addresses:
        version = ipaddress.ip_address(address).version
        if (version == 4 and use_ipv4) or (version == 6 and use_ipv6):
            out.append(address)
    return out


def set_host_addresses(addresses: tuple[str, ...]) -> None:
    """Offer exactly `addresses` as host candidates (() = aioice's default: every non-loopback address)."""
    global _allowed_host_addresses
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"config [webrtc].host_addresses: {address!r} is not an IP address") from None
    _allowed_host_addresses = tuple(addresses)
    aioice.ice.get_host_addresses = _configured_host_addresses


def set_consent_checks(interval_s: float, failures: int) -> None:
    """ICE consent freshness (RFC 7675): aioice checks every ~5 s and gives up after 6 misses (~33 s):
    check every `interval_s`, give up after `failures` instead. aioice reads these module constants on
    each check, so this applies to every connection in the process."""
    aioice.ice.CONSENT_INTERVAL = interval_s
    aioice.ice.CONSENT_FAILURES = failures


def _is_loopback(address: str) -> bool | None:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return None  # an mDNS name (xxxx.local) or a hostname


_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ ", re.IGNORECASE)


MAX_CANDIDATES_PER_ADDRESS = 4  # host, srflx or relay on one IP: UDP and TCP, RTP and RTCP at most


def filter_remote_candidates(
    sdp: str, host_addresses: tuple[str, ...], max_candidates: int = 0, max_per_address: int = 0
) -> tuple[str, int]:
    """Drop candidates we cannot pair with our host addresses, and those past the caps (0: no cap), in
    offer order. Returns (sdp, number dropped)."""
    if not host_addresses and not max_candidates and not max_per_address:
        return sdp, 0
    ours_loopback = {bool(_is_loopback(a)) for a in host_addresses}
    kept, dropped, total = [], 0, 0
    per_address: dict[str, int] = {}
    for line in sdp.splitlines():
        match = _CANDIDATE.match(line)
        if match:
            address = match.group(1).lower()
            theirs = _is_loopback(address)
            if not host_addresses:
                reachable = True
            elif theirs is None:
                reachable = False in ours_loopback  # mDNS names resolve to LAN addresses
            else:
                reachable = theirs in ours_loopback
            over = (max_candidates and total >= max_candidates) or (
                max_per_address and per_address.get(address, 0) >= max_per_address
            )
            if not reachable or over:
                dropped += 1
                continue
            total += 1
            per_address[address] = per_address.get(address, 0) + 1
        kept.append(line)
    return "\r\n".join(kept) + "\r\n", dropped


_sctp_data_channel_receive = RTCSctpTransport._data_channel_receive


async def _data_channel_receive(self: RTCSctpTransport, stream_id: int, pp_id: int, data: bytes) -> None:
    channel = self._data_channels.get(stream_id) if pp_id == WEBRTC_STRING else None
    if channel is not None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            channel.emit("message", NotUtf8Text(data))
            return
        channel.emit("message", text)
        return
    await _sctp_data_channel_receive(self, stream_id, pp_id, data)


RTCSctpTransport._data_channel_receive = _data_channel_receive  # type: ignore[method-assign]


class SdpError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


def _sections(sdp: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """-> (session-level lines, [(media kind, its lines)])."""
    session: list[str] = []
    media: list[tuple[str, list[str]]] = []
    for line in sdp.splitlines():
        line = line.strip()
        if line.startswith("m="):
            media.append((line[2:].split(" ", 1)[0], []))
        elif media:
            media[-1][1].append(line)
        else:
            session.append(line)
    return session, media


def _direction(lines: list[str], default: str) -> str:
    for line in lines:
        if line.startswith("a=") and line[2:] in DIRECTIONS:
            return line[2:]
    return default


def check_offer(sdp: str) -> None:
    """Reject what we cannot answer, with a reason, before aiortc gets it."""
    if not sdp.strip():
        raise SdpError("invalid_sdp", "the SDP offer is empty")
    if not sdp.lstrip().startswith("v=0"):
        raise SdpError("invalid_sdp", "the body is not an SDP offer (it must start with 'v=0')")
    session, media = _sections(sdp)
    kinds = [kind for kind, _ in media]
    if "audio" not in kinds:
        raise SdpError("no_audio", f"the offer has no audio section (media: {', '.join(kinds) or 'none'})")
    if not re.search(r"^a=rtpmap:\d+ opus/48000", sdp, re.MULTILINE | re.IGNORECASE):
        raise SdpError("no_opus", "the offer's audio section does not offer Opus (opus/48000)")
    mids = {line[6:] for _, lines in media for line in lines if line.startswith("a=mid:")}
    for line in session:
        if line.startswith("a=group:BUNDLE"):
            missing = [mid for mid in line.split()[1:] if mid not in mids]
            if missing:
                raise SdpError(
                    "invalid_sdp",
                    f"a=group:BUNDLE names mid(s) {', '.join(missing)} that no media section has",
                )
    # aiortc asserts on these later, in a task nobody awaits (after we answered 201): the call would
    # hang until connect_timeout and the log get "Task exception was never retrieved".
    for attribute in ("a=fingerprint:", "a=ice-ufrag:", "a=ice-pwd:"):
        if not any(line.startswith(attribute) for line in session) and not all(
            any(line.startswith(attribute) for line in lines) for _, lines in media
        ):
            raise SdpError("invalid_sdp", f"the offer has no {attribute[2:-1]} (DTLS-SRTP and ICE need it)")
    # The client's direction, as the client writes it. It must send us nothing or listen to us:
    # `sendonly` / `inactive` would never hear a reply (recvonly - listen only, typed turns - is served).
    audio = next(lines for kind, lines in media if kind == "audio")
    direction = _direction(audio, _direction(session, "sendrecv"))
    if direction in ("sendonly", "inactive"):
        raise SdpError(
            "unsupported_direction",
            f"the offer's audio section is {direction}: this server answers "
            "with speech, so offer sendrecv (talk and listen) or recvonly (listen, typed turns)",
        )


class PolicedJitterBuffer(JitterBuffer):
    """aiortc's jitter buffer, with each Opus packet charged against the call's real-time budget first:
    a packet over it is dropped before it is decoded (server/webrtc/packets.py)."""

    def __init__(
        self, charge: Charge, opus_types: frozenset[int], capacity: int = 16, prefetch: int = 0
    ) -> None:
        super().__init__(capacity=capacity, prefetch=prefetch)
        self.charge = charge
        self.opus_types = opus_types

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        if packet.payload_type in self.opus_types and not self.charge(opus_duration_s(packet.payload)):
            return False, None
        return self.release(packet)

    def release(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        return super().add(packet)


class InOrderAudioJitterBuffer(PolicedJitterBuffer):
    """Releases each audio packet as soon as it arrives in order; late packets are dropped."""

    def __init__(self, charge: Charge, opus_types: frozenset[int]) -> None:
        super().__init__(charge, opus_types)
        self._last_seq: int | None = None
        self.late_packets = 0

    def release(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        seq = packet.sequence_number
        if self._last_seq is not None:
            ahead = (seq - self._last_seq) & 0xFFFF
            if ahead == 0 or ahead >= 0x8000:  # a duplicate, or older than what we released
                self.late_packets += 1
                return False, None
        self._last_seq = seq
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]


def set_receive_jitter(pc: RTCPeerConnection, frames: int, charge: Charge) -> bool:
    """Swap the audio receivers' jitter buffers (ours police Opus packets with `charge`, the call's
    real-time budget); call after setRemoteDescription, before media flows. -> whether Opus is policed
    per packet (else its frames must be, as every other codec's are)."""
    policed = True
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "audio":
            continue
        codecs = getattr(transceiver, "_codecs", [])  # negotiated by setRemoteDescription
        opus = frozenset(c.payloadType for c in codecs if c.mimeType.lower() == "audio/opus")
        policed = policed and bool(opus)
        buffer = (
            InOrderAudioJitterBuffer(charge, opus)
            if frames == 0
            else PolicedJitterBuffer(charge, opus, capacity=16, prefetch=frames)
        )
        receiver = transceiver.receiver
        if not hasattr(receiver, "_RTCRtpReceiver__jitter_buffer"):
            raise RuntimeError(
                "this aiortc version has no RTCRtpReceiver.__jitter_buffer; set "
                "[webrtc].receive_jitter_frames = 4 to keep aiortc's own buffer"
            )
        receiver._RTCRtpReceiver__jitter_buffer = buffer  # type: ignore[attr-defined]
    return policed

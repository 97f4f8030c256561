"""The WebRTC transport of a call: events on the `oai-events` data channel, the assistant's audio on a
paced 48 kHz track (server/webrtc/media.py), the user's audio from the peer's Opus track.

Built by server/webrtc/signalling.py, which wires the peer connection's events to it and to the call.
Events sent before the data channel opens wait (at most `MAX_EVENTS_BEFORE_OPEN`); the call's
`session.created` goes first when it opens. Data channels with another label are closed at once; the
first `LOGGED_CHANNELS` are logged (label cut to `LOGGED_LABEL_CHARS`), and a call that opens more than
`MAX_OTHER_CHANNELS` is ended (`too_many_channels`): a label is the client's text, up to 64 KiB each.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from server.webrtc.media import InboundConverter, OutboundAudioTrack
from server.webrtc.packets import OPUS_RATE_HZ

if TYPE_CHECKING:
    from server.call.call import Call

log = logging.getLogger("glm4voice.webrtc")
MAX_EVENTS_BEFORE_OPEN = 64  # events queued until the client's data channel opens
PC_CLOSE_TIMEOUT_S = 5.0  # aiortc's close awaits its transports; a stuck one must not hold the call slot
MAX_OTHER_CHANNELS = 16  # data channels not named oai-events, per call: past it the call is ended
LOGGED_CHANNELS = 2  # of those, how many get a log line
LOGGED_LABEL_CHARS = 40  # of a label, what a log line shows


class WebRtcTransport:
    plays_out = True  # the track is paced on our clock: we know what went out, and when
    resumable = True

    def __init__(self, pc: RTCPeerConnection) -> None:
        self.pc = pc
        self.audio = OutboundAudioTrack()
        self._channel: RTCDataChannel | None = None
        self._outbox: list[str] = []
        self._converter = InboundConverter()
        self._inbound_attached = False
        self._other_channels = 0
        self.opus_policed = False  # set by signalling: Opus charged per packet before decoding

    # ----- the peer connection's events (wired by signalling) --------------------------------------

    def attach_inbound(self, track: MediaStreamTrack, call: Call) -> None:
        if self._inbound_attached:  # one microphone per call; another audio section is ignored
            return
        self._inbound_attached = True
        call.spawn(self._receive_audio(track, call), "recv")

    def _refuse_channel(self, channel: RTCDataChannel, call: Call) -> None:
        """Another label: closed at once; a few log lines with the label cut; too many end the call."""
        self._other_channels += 1
        channel.close()
        if self._other_channels <= LOGGED_CHANNELS:
            label = channel.label[:LOGGED_LABEL_CHARS] + (
                "..." if len(channel.label) > LOGGED_LABEL_CHARS else ""
            )
            call.log.info(
                "closed data channel %r (%d characters): only oai-events is read", label, len(channel.label)
            )
        if self._other_channels == MAX_OTHER_CHANNELS + 1:
            call.log.info("more than %d other data channels: ending the call", MAX_OTHER_CHANNELS)
            call.spawn(
                call.end(
                    "too_many_channels", f"more than {MAX_OTHER_CHANNELS} data channels besides oai-events"
                ),
                "end",
            )

    def attach_channel(self, channel: RTCDataChannel, call: Call) -> None:
        if channel.label != "oai-events":
            self._refuse_channel(channel, call)
            return
        self._channel = channel
        channel.on("message", call.receive)

        def opened() -> None:
            call.start()
            outbox, self._outbox = self._outbox, []
            for text in outbox:
                channel.send(text)

        if channel.readyState == "open":
            opened()
        else:
            channel.on("open", opened)

    async def _receive_audio(self, track: MediaStreamTrack, call: Call) -> None:
        """The receive loop: 20 ms frames -> 16 kHz chunks. Opus was policed against real time per packet,
        before decoding (server/webrtc/packets.py); a frame of another codec is policed here."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            charged = self.opus_policed and frame.sample_rate == OPUS_RATE_HZ
            if not charged and not call.audio_arrived(frame.samples / frame.sample_rate):
                continue
            for chunk in self._converter.push(frame):  # (512,) float32 16 kHz each
                call.hear(chunk)

    # ----- the Transport seam -----------------------------------------------------------------------

    def send(self, text: str) -> None:
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(text)
        elif len(self._outbox) < MAX_EVENTS_BEFORE_OPEN:
            self._outbox.append(text)

    async def flush(self, timeout_s: float) -> None:
        """Until the data channel has handed every queued message to SCTP (its `bufferedamountlow` event
        at threshold 0 fires after the send), at most `timeout_s`."""
        channel = self._channel
        if (
            channel is None
            or channel.readyState != "open"
            or channel.bufferedAmount <= channel.bufferedAmountLowThreshold
        ):
            return
        low = asyncio.get_running_loop().create_future()

        def on_low() -> None:
            if not low.done():
                low.set_result(None)

        channel.once("bufferedamountlow", on_low)
        try:
            await asyncio.wait_for(low, timeout_s)
        except TimeoutError:
            log.info("closing event not flushed within %.1f s", timeout_s)
        finally:
            channel.remove_listener("bufferedamountlow", on_low)

    async def close(self) -> None:
        self._converter.reset()
        try:
            await asyncio.wait_for(self.pc.close(), PC_CLOSE_TIMEOUT_S)
        except Exception as exc:  # TimeoutError included
            log.warning("peer connection close failed: %s", repr(exc))

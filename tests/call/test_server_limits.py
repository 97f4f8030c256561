"""Limits and liveness: event floods, call duration, idle time, a vanished peer, over-long turns."""

from __future__ import annotations

import asyncio
import fractions
import json
import time

import aiohttp
import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from server.app import Server
from server.call.call import Call
from server.call.guard import CallGuard
from server.config import LimitsConfig, load_config
from server.echo import EchoResponder
from server.webrtc.transport import WebRtcTransport
from tests.helpers.rtc_client import RealtimeClient, start_server
from tests.helpers.speech import ENGLISH_SENTENCES, have_speech_tools, synth_speech

# make test installs espeak-ng and sox; their absence is a failure, not a skip.
assert have_speech_tools(), "espeak-ng and sox are needed (make test installs them)"


def test_call_guard_clocks():
    limits = LimitsConfig(
        max_events_per_s=10, event_burst=5, max_call_duration_s=100, idle_timeout_s=30, peer_timeout_s=5
    )
    guard = CallGuard(limits, now_s=0.0)
    assert guard.check(29.0, replying=False) is None
    assert guard.check(31.0, replying=False).code == "idle_timeout"
    assert guard.check(31.0, replying=True) is None  # a reply in progress keeps the call
    guard.user_activity(31.0)
    assert guard.check(40.0, replying=False) is None
    guard.inbound_frame(40.0, 0.02)  # media flowed: from now on silence on the wire means a vanished peer
    assert guard.check(44.9, replying=False) is None
    ending = guard.check(45.0, replying=False)
    assert ending.code == "peer_gone" and not ending.notify
    guard.inbound_frame(99.0, 0.02)
    guard.user_activity(99.0)
    assert guard.check(100.0, replying=False).code == "max_duration"
    # Events: a burst of 5, then 10/s; one complaint a second at most.
    flood = [guard.event_arrived(200.0) for _ in range(20)]
    assert sum(ok for ok, _ in flood) == 5 and sum(complain for _, complain in flood) == 1
    assert guard.event_arrived(200.5) == (True, False)  # 5 tokens back after 0.5 s
    assert guard.events_dropped == 15
    # An answered offer that never connects is dropped after connect_timeout_s (default 20 s).
    fresh = CallGuard(limits, now_s=0.0)
    assert fresh.check(19.0, replying=False, connected=False) is None
    assert fresh.check(20.0, replying=False, connected=False).code == "connect_timeout"


async def test_offer_that_never_connects_frees_its_slot():
    running = await start_server(overrides={"limits": {"connect_timeout_s": 1.0, "max_calls": 1}})
    try:
        pc = RTCPeerConnection()  # offers, never takes the answer
        pc.addTransceiver("audio")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(
                running.base_url + "/v1/realtime/calls",
                data=pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp"},
            ) as r:
                assert r.status == 201
        await pc.close()
        call = next(iter(running.server.calls.values()))
        await asyncio.wait_for(call.closed.wait(), 5)
        assert call.close_reason == "connect_timeout" and running.server.calls == {}
        client = RealtimeClient(running.base_url)  # the slot is free again
        await client.connect()
        await client.hangup()
    finally:
        await running.runner.cleanup()


async def test_event_flood_is_dropped_and_the_call_goes_on():
    running = await start_server(overrides={"limits": {"max_events_per_s": 20, "event_burst": 40}})
    client = RealtimeClient(running.base_url)
    try:
        await client.connect()
        await client.wait_for("session.created", 5)
        for i in range(400):
            client.send({"type": "glm4voice.ping", "event_id": f"flood_{i}"})
        await asyncio.sleep(1.5)
        mark = len(client.events)
        client.send({"type": "glm4voice.ping", "event_id": "after"})
        pong = await client.wait_for("glm4voice.pong", 5, after=mark)  # the call still answers
        assert pong["ping_event_id"] == "after"
        errors = [e for e in client.of_type("error") if e["error"]["code"] == "rate_limited"]
        pongs = [e for e in client.of_type("glm4voice.pong") if e["ping_event_id"].startswith("flood_")]
        assert 1 <= len(errors) <= 5, len(errors)  # told about once a second, not flooded back
        assert 40 <= len(pongs) < 160, len(pongs)  # the burst and the rate, not all 400
        assert running.server.metrics.value("glm4voice_events_dropped_total") == 400 - len(pongs)
    finally:
        await client.hangup()
        await running.runner.cleanup()


async def test_idle_timeout_and_max_duration_end_calls_with_a_reason():
    running = await start_server(overrides={"limits": {"idle_timeout_s": 1.5, "max_call_duration_s": 3.0}})
    idle, busy = RealtimeClient(running.base_url), RealtimeClient(running.base_url)
    try:
        await idle.connect()
        idle_call = running.server.calls[idle.call_id]  # its clocks start when the offer is answered
        await busy.connect()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5 and running.server.calls:
            busy.send({"type": "glm4voice.ping"})  # events count as activity
            await asyncio.sleep(0.3)
        closing = await idle.wait_for("glm4voice.call.closing", 1)
        assert closing["reason"] == "idle_timeout"
        assert 1.5 <= idle.event_time(closing) - idle_call.created_s <= 3.0
        closing = await busy.wait_for("glm4voice.call.closing", 1)
        assert closing["reason"] == "max_duration" and "3 s" in closing["message"]
        assert running.server.calls == {}
        metrics = running.server.metrics.render(0)
        assert 'glm4voice_calls_ended_total{reason="idle_timeout"} 1.0' in metrics
        assert 'glm4voice_calls_ended_total{reason="max_duration"} 1.0' in metrics
    finally:
        await idle.close()
        await busy.close()
        await running.runner.cleanup()


@pytest.mark.parametrize("watch", ["media", "consent"])
async def test_vanished_peer_is_noticed_within_seconds(watch):
    # Each watch alone: inbound media silence at its default 5 s ("media"; consent checks made lax), ICE
    # consent every 1 s with 3 misses ("consent"; media watch off, as for a peer that sends no audio).
    overrides = (
        {"limits": {"peer_timeout_s": 0.0}, "webrtc": {"consent_interval_s": 1.0, "consent_failures": 3}}
        if watch == "consent"
        else {"webrtc": {"consent_failures": 20}}
    )
    running = await start_server(overrides=overrides)
    client = RealtimeClient(running.base_url)
    try:
        await client.connect()
        await client.wait_for("session.created", 5)
        await asyncio.sleep(0.5)  # media flows
        call = next(iter(running.server.calls.values()))
        # The peer vanishes: its sockets go away without a DTLS close or an SCTP abort.
        connection = client.pc.sctp.transport.transport._connection
        for protocol in list(connection._protocols):
            protocol.transport.close()
        t0 = time.monotonic()
        await asyncio.wait_for(call.closed.wait(), 10)
        noticed_s = time.monotonic() - t0
        print(f"vanished peer: call closed after {noticed_s:.1f} s ({call.close_reason})")
        assert noticed_s < 8.0
        if watch == "media":
            assert call.close_reason == "peer_gone"
        else:
            assert call.close_reason.startswith(("peer connection failed", "peer connection closed")), (
                call.close_reason
            )
        assert running.server.calls == {}
    finally:
        await client.close()
        await running.runner.cleanup()


async def test_overlong_spoken_turn_is_cut_and_answered():
    speech = synth_speech(ENGLISH_SENTENCES[1], voice="en")
    assert speech.size > 3 * 16_000
    running = await start_server(overrides={"limits": {"max_turn_audio_s": 2.0}})
    client = RealtimeClient(running.base_url)
    try:
        await client.connect()
        client.mic.play(speech, 16_000)
        error = await client.wait_for("error", 10)
        assert error["error"]["code"] == "input_audio_too_long"
        stopped = await client.wait_for("input_audio_buffer.speech_stopped", 2)
        await client.wait_for("input_audio_buffer.committed", 2)
        await client.wait_for("response.created", 2)
        started = client.of_type("input_audio_buffer.speech_started")[0]
        assert stopped["audio_end_ms"] - started["audio_start_ms"] <= 2_100
        session = running.server.calls[client.call_id].session
        assert session.history[0].role == "user" and 1_900 <= session.history[0].audio_ms <= 2_000
    finally:
        await client.hangup()
        await running.runner.cleanup()


class FastTrack(MediaStreamTrack):
    """Inbound audio as fast as the call can take it (no real-time pacing): 48 kHz mono frames."""

    kind = "audio"

    def __init__(self, pcm48k: np.ndarray) -> None:
        super().__init__()
        self._pcm = (np.clip(pcm48k, -1, 1) * 32767).astype(np.int16)
        self._index = 0
        self.done = asyncio.Event()

    async def recv(self) -> av.AudioFrame:
        start = self._index * 960
        if start >= self._pcm.size:
            self.done.set()
            raise MediaStreamError
        self._index += 1
        if self._index % 50 == 0:
            await asyncio.sleep(0)
        frame = av.AudioFrame.from_ndarray(
            self._pcm[start : start + 960].reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = 48_000
        frame.pts = start
        frame.time_base = fractions.Fraction(1, 48_000)
        return frame


class FakeChannel:
    label = "oai-events"
    readyState = "open"
    bufferedAmount = 0

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def on(self, event: str, handler) -> None:
        pass

    def send(self, text: str) -> None:
        self.sent.append(json.loads(text))


async def test_ten_minutes_of_push_to_talk_audio_is_capped(monkeypatch):
    """A 10-minute push-to-talk turn through the real inbound path (converter, VAD, call), unpaced (the
    real-time policing of inbound audio, tested in test_server_hostile_events.py, is widened for it)."""
    from server.call import guard as call_guard

    monkeypatch.setattr(call_guard, "INBOUND_BURST_S", 700.0)
    config = load_config(
        None, env={}, overrides={"responder": {"kind": "echo"}, "limits": {"connect_timeout_s": 0}}
    )  # no peer ever connects
    server = Server(config, EchoResponder())
    transport = WebRtcTransport(RTCPeerConnection())
    call = Call(
        "rtc_ten_minutes",
        transport,
        server.responder,
        server.vad,
        config,
        server.metrics,
        server.default_settings(),
        on_closed=lambda c: None,
    )
    channel = FakeChannel()
    transport.attach_channel(channel, call)
    try:
        call.receive(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        noise = np.random.default_rng(0).uniform(-0.3, 0.3, 600 * 48_000).astype(np.float32)
        track = FastTrack(noise)
        t0 = time.monotonic()
        transport.attach_inbound(track, call)
        await asyncio.wait_for(track.done.wait(), 120)
        print(f"10 min of inbound audio processed in {time.monotonic() - t0:.1f} s")
        errors = [e for e in channel.sent if e["type"] == "error"]
        assert [e["error"]["code"] for e in errors] == ["input_audio_too_long"]  # once, not per chunk
        mark = len(channel.sent)
        call.receive(json.dumps({"type": "input_audio_buffer.commit"}))
        assert "input_audio_buffer.committed" in [e["type"] for e in channel.sent[mark:]]
        user = call.session.history[-1]
        assert user.role == "user" and user.audio_ms == pytest.approx(
            config.limits.max_turn_audio_s * 1000, abs=40
        )
    finally:
        await call.close("test over")

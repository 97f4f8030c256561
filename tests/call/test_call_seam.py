"""The transport seam: a `Call` driven through a fake transport, with no aiortc and no aiohttp.

The fake records what the call asks of its transport (events, audio begun / pushed / cleared, close);
a scripted responder session and a VAD that calls loud chunks speech make the call's decisions
deterministic. Both kinds of transport are covered: one whose audio plays out on the server's clock
(WebRTC's kind) and one whose client plays it (WebSocket's kind).
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from pipeline.responder import AudioChunk, Reply, ReplyDone, ResponderInfo, ResponderSession
from server.call.call import Call
from server.call.resume import ParkedCalls
from server.call.settings import CallSettings
from server.call.state import CallState
from server.call.transport import AudioOut, PlayoutStats, Transport
from server.config import load_config
from server.metrics import Metrics
from server.realtime import session_update

CHUNK = 512  # 32 ms at 16 kHz: the VAD's unit
LOUD = np.full(CHUNK, 0.3, np.float32)
QUIET = np.zeros(CHUNK, np.float32)


class FakeAudioOut:
    """Records the reply audio; plays nothing (as if every chunk went out at once)."""

    def __init__(self) -> None:
        self.on_started = self.on_stopped = self.on_frame = None
        self.stats = PlayoutStats()
        self.queued_ms = 0.0
        self.reply_id: str | None = None
        self.pushed_ms = 0.0
        self.log: list[str] = []

    @property
    def active(self) -> bool:
        return self.reply_id is not None

    def begin_reply(self, reply_id: str) -> None:
        self.reply_id, self.pushed_ms = reply_id, 0.0
        self.log.append("begin")

    def push(self, pcm: np.ndarray, sample_rate_hz: int) -> None:
        if self.reply_id is not None:
            self.pushed_ms += pcm.size * 1000.0 / sample_rate_hz
            self.log.append("push")

    def end_reply(self) -> None:
        self.log.append("end")

    def clear(self) -> float:
        self.reply_id = None
        self.log.append("clear")
        return self.pushed_ms

    def stop(self) -> None:
        self.log.append("stop")


class FakeTransport:
    def __init__(self, plays_out: bool, resumable: bool = False) -> None:
        self.audio: AudioOut = FakeAudioOut()
        self.plays_out = plays_out
        self.resumable = resumable
        self.sent: list[dict] = []
        self.closed = False

    def send(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def flush(self, timeout_s: float) -> None:
        pass

    async def close(self) -> None:
        self.closed = True

    def types(self) -> list[str]:
        return [e["type"] for e in self.sent]


class EndlessReply(Reply):
    """One 100 ms chunk, then nothing until it is cancelled (a long reply still generating)."""

    def __init__(self) -> None:
        self.cut = asyncio.Event()
        self.cancelled_ms: float | None = None

    async def events(self):
        yield AudioChunk(np.full(2_205, 0.1, np.float32), 22_050)
        await self.cut.wait()
        yield ReplyDone("cancelled", "")

    def cancel(self, played_ms: float | None = None) -> None:
        self.cancelled_ms = played_ms
        self.cut.set()


class ScriptedSession(ResponderSession):
    def __init__(self) -> None:
        self.replies: list[EndlessReply] = []
        self.audio_samples = 0
        self.closed = False

    def update(self, settings) -> None: ...

    def push_audio(self, pcm16k: np.ndarray) -> None:
        self.audio_samples += pcm16k.size

    def commit_audio(self) -> None: ...
    def discard_audio(self) -> None: ...
    def add_text(self, text: str) -> None: ...

    def respond(self) -> Reply:
        self.replies.append(EndlessReply())
        return self.replies[-1]

    async def close(self) -> None:
        self.closed = True


class ScriptedResponder:
    def __init__(self) -> None:
        self.session = ScriptedSession()

    def open_session(self, call_id: str, settings) -> ResponderSession:
        return self.session

    def info(self) -> ResponderInfo:
        return ResponderInfo(name="scripted", ready=True, output_sample_rate_hz=22_050)


class LoudIsSpeech:
    """A VAD for tests: a chunk is speech when it is loud."""

    def probability(self, state, chunk: np.ndarray) -> float:
        return 1.0 if float(np.abs(chunk).max()) > 0.1 else 0.0


def _call(transport: Transport, parking: ParkedCalls | None = None) -> tuple[Call, ScriptedSession, list]:
    config = load_config(None, env={}, overrides={"responder": {"kind": "echo"}})
    responder = ScriptedResponder()
    closed: list[Call] = []
    call = Call(
        "rtc_seam",
        transport,
        responder,
        LoudIsSpeech(),
        config,
        Metrics(),
        CallSettings.defaults(config.turn_detection),
        closed.append,
        parking=parking,
    )
    call.extension_events = True  # as a door does for a client that asks: these tests read our events
    call.connected()
    return call, responder.session, closed


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_events_go_out_through_the_transport():
    transport = FakeTransport(plays_out=True)
    call, _, _ = _call(transport)
    try:
        call.start()
        assert transport.types() == ["session.created"]
        call.receive(json.dumps({"type": "glm4voice.ping", "event_id": "e1"}))
        call.receive(json.dumps({"type": "session.update", "session": {"instructions": "be brief"}}))
        call.receive("not json")
        assert transport.types()[1:] == ["glm4voice.pong", "session.updated", "error"]
        assert transport.sent[2]["session"]["instructions"] == "be brief"
    finally:
        await call.close("test over")


async def test_a_control_connection_observes_and_is_limited_to_its_events():
    transport = FakeTransport(plays_out=True)
    call, _, _ = _call(transport)
    seen: list[str] = []
    answers: list[dict] = []
    try:
        stop = call.observe(seen.append)
        call.start()
        call.receive(
            json.dumps({"type": "input_audio_buffer.clear"}),
            only=(session_update.SessionUpdate,),
            answer=answers.append,
        )
        assert [a["error"]["code"] for a in answers] == ["unsupported_value"]
        assert [json.loads(t)["type"] for t in seen] == ["session.created"]  # errors go to the sender only
        stop()
        call.receive(json.dumps({"type": "glm4voice.ping"}))
        assert len(seen) == 1 and transport.types()[-1] == "glm4voice.pong"
    finally:
        await call.close("test over")


@pytest.mark.parametrize("plays_out", [True, False])
async def test_barge_in_clears_the_audio(plays_out):
    """Speech over a reply: a transport that plays out is cleared after min_interrupt_ms of speech and
    reports output_audio_buffer.cleared; one whose client plays the audio is cleared at speech start."""
    transport = FakeTransport(plays_out=plays_out)
    call, session, _ = _call(transport)
    audio = transport.audio
    try:
        call.start()
        call.receive(json.dumps({"type": "response.create"}))
        await _settle()
        assert audio.log[:2] == ["begin", "push"] and call.replies.current is not None
        min_interrupt_ms = call.settings.turns.min_interrupt_ms
        chunks_before_cut = 0
        while "clear" not in audio.log:
            call.hear(LOUD)
            chunks_before_cut += 1
            assert chunks_before_cut * 32 < min_interrupt_ms + 200, "no barge-in"
        speech_ms = chunks_before_cut * 32
        if plays_out:
            assert speech_ms >= min_interrupt_ms
        else:
            assert speech_ms <= 32 * 2
        await _settle()
        reply = session.replies[0]
        assert reply.cancelled_ms == pytest.approx(100.0)  # what went out of the transport
        types = transport.types()
        assert ("output_audio_buffer.cleared" in types) is plays_out
        assert "glm4voice.response.cancelled" in types
        assert call.replies.current is None and call.state is CallState.USER_SPEAKING
    finally:
        await call.close("test over")


async def test_user_audio_is_policed_against_real_time():
    transport = FakeTransport(plays_out=True)
    call, _, _ = _call(transport)
    try:
        call.start()
        assert call.audio_arrived(0.02)
        assert not call.audio_arrived(3600.0)  # an hour of audio at once
        assert "input_audio_too_fast" in [e["error"]["code"] for e in transport.sent if e["type"] == "error"]
    finally:
        await call.close("test over")


async def test_close_releases_everything():
    transport = FakeTransport(plays_out=True)
    call, session, closed = _call(transport)
    call.start()
    call.receive(json.dumps({"type": "response.create"}))
    await _settle()
    await call.close("hangup")
    assert transport.closed and "stop" in transport.audio.log
    assert session.closed and session.replies[0].cut.is_set()
    assert closed == [call] and call.closed.is_set() and call.state is CallState.CLOSED
    assert call.replies.current is None and call.replies.idle.is_set()
    await call.close("again")  # idempotent
    assert closed == [call]


async def test_a_dropped_resumable_call_parks_and_an_unresumable_one_closes():
    parked = ParkedCalls(window_s=30.0)
    resumable = FakeTransport(plays_out=True, resumable=True)
    call, session, _ = _call(resumable, parking=parked)
    call.start()
    assert call.resume_token is not None and "resume_token" in resumable.sent[0]
    await call.close("network gone", network_lost=True)
    assert resumable.closed and not session.closed and parked.holds(call.resume_token)
    await parked.close_all()
    assert session.closed

    fixed = FakeTransport(plays_out=False, resumable=False)
    call, session, _ = _call(fixed, parking=parked)
    call.start()
    assert call.resume_token is None and "resume_token" not in fixed.sent[0]
    await call.close("network gone", network_lost=True)
    assert session.closed and len(parked) == 0


def test_the_call_does_not_import_a_transport():
    """Run in a fresh interpreter: building a call's modules pulls in neither aiortc nor aiohttp."""
    import subprocess
    import sys

    code = (
        "import sys; import server.call.call, server.call.transport; "
        "print(sorted(m for m in ('aiortc', 'aiohttp', 'av') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""Transcripts of spoken turns on demo weights (a tiny random Whisper: the text is babble, the path real).

Order and independence are asserted with a seam that holds the transcriber until the test lets it go,
never with timings: the reply's first audio arrives while the transcript is held.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from pipeline.engine.config import EngineConfig
from pipeline.engine.thread import GLMVoiceResponder
from pipeline.responder import (
    AudioChunk,
    ReplyDone,
    SessionSettings,
    TranscriptDelta,
    TranscriptDone,
    TranscriptFailed,
    TranscriptionSettings,
)
from pipeline.transcription.config import TranscriptionConfig
from tests.helpers.engine import settled

TRANSCRIBED = SessionSettings(transcription=TranscriptionSettings())
WAIT_S = 60.0  # deadline of every wait (a busy 2-core machine); nothing here measures time


@pytest.fixture(scope="module")
def responder(demo_dir):
    r = GLMVoiceResponder(
        EngineConfig(demo_weights_dir=str(demo_dir), device="cpu"),
        transcription=TranscriptionConfig(enabled="on"),
    )
    asyncio.run(r.start())
    yield r
    asyncio.run(r.stop())


@pytest.fixture
def worker(responder):
    w = responder.engine.scheduler.transcription
    real = w.model
    yield w
    w.model = real


class Held:
    """The seam: wraps the transcriber; each call waits until `release` is set (or raises `fail`)."""

    def __init__(self, real, fail: Exception | None = None) -> None:
        self.real, self.fail = real, fail
        self.name, self.device = real.name, real.device
        self.started = threading.Event()
        self.release = threading.Event()

    def transcribe(self, pcm16k, **kwargs):
        self.started.set()
        assert self.release.wait(WAIT_S)
        if self.fail is not None:
            raise self.fail
        return self.real.transcribe(pcm16k, **kwargs)


def speech(seconds: float, seed: int) -> np.ndarray:
    """A voiced-like test signal (a 150 Hz buzz with noise), 16 kHz float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 150 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def speak(session, pcm: np.ndarray) -> None:
    for start in range(0, pcm.size, 512):
        session.push_audio(pcm[start : start + 512])
    session.commit_audio()


async def reply_events(reply) -> list:
    async def run() -> list:
        return [event async for event in reply.events()]

    return await asyncio.wait_for(run(), WAIT_S)


async def transcript_events(stream, items: int) -> list:
    """Events of the transcript stream until `items` items have completed or failed."""
    events: list = []

    async def run() -> None:
        async for event in stream:
            events.append(event)
            if sum(isinstance(e, TranscriptDone | TranscriptFailed) for e in events) == items:
                return

    await asyncio.wait_for(run(), WAIT_S)
    return events


def check_transcript(events: list, item: int) -> TranscriptDone:
    mine = [e for e in events if e.item == item]
    done = mine[-1]
    assert isinstance(done, TranscriptDone) and all(isinstance(e, TranscriptDelta) for e in mine[:-1])
    assert "".join(e.text for e in mine[:-1]) == done.text  # the deltas add up to the transcript
    return done


async def test_transcript_arrives_and_the_reply_does_not_wait_for_it(responder, worker):
    held = Held(worker.model)
    worker.model = held
    session = responder.open_session("transcribed", TRANSCRIBED)
    stream = session.transcripts()
    pcm = speech(1.5, seed=1)
    speak(session, pcm)
    events = await reply_events(session.respond())  # the whole reply, while the transcriber is held
    assert isinstance(events[-1], ReplyDone) and any(isinstance(e, AudioChunk) for e in events)
    assert await asyncio.to_thread(held.started.wait, WAIT_S)  # the job reached the transcriber ...
    next_event = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    assert not next_event.done()  # ... and nothing was emitted for it yet
    held.release.set()
    first = await asyncio.wait_for(next_event, WAIT_S)
    rest = [] if isinstance(first, TranscriptDone) else await transcript_events(stream, 1)
    done = check_transcript([first, *rest], item=0)
    assert done.audio_ms == pytest.approx(1000 * pcm.size / 16000)
    expected = held.real.transcribe(pcm, language="", prompt="")  # the same model straight: same text
    assert (done.text, done.language) == (expected.text, expected.language) and done.text
    await session.close()


async def test_language_and_prompt_reach_whisper(responder, worker):
    seen: list[dict] = []
    real = worker.model

    class Spy:
        name, device = real.name, real.device

        def transcribe(self, pcm16k, **kwargs):
            seen.append({k: kwargs[k] for k in ("language", "prompt")})
            return real.transcribe(pcm16k, **kwargs)

    worker.model = Spy()
    settings = SessionSettings(transcription=TranscriptionSettings(language="zh", prompt="北京天气"))
    session = responder.open_session("language", settings)
    speak(session, speech(1.0, seed=2))
    done = check_transcript(await transcript_events(session.transcripts(), 1), item=0)
    assert done.language == "zh" and seen == [{"language": "zh", "prompt": "北京天气"}]
    await session.close()


async def test_a_failure_is_the_items_failed_event_and_the_call_goes_on(responder, worker):
    held = Held(worker.model, fail=RuntimeError("the device fell over"))
    held.release.set()
    worker.model = held
    session = responder.open_session("failing", TRANSCRIBED)
    stream = session.transcripts()
    speak(session, speech(1.0, seed=3))
    events = await reply_events(session.respond())
    assert isinstance(events[-1], ReplyDone) and events[-1].reason == "stop"
    (failed,) = await transcript_events(stream, 1)
    assert isinstance(failed, TranscriptFailed) and failed.item == 0 and "fell over" in failed.message
    worker.model = held.real  # the next turn of the same call is transcribed again
    session.add_text("typed between")  # item 1: typed, never transcribed
    speak(session, speech(1.0, seed=4))  # item 2
    events = await reply_events(session.respond())
    assert isinstance(events[-1], ReplyDone) and events[-1].reason == "stop"
    check_transcript(await transcript_events(stream, 1), item=2)
    await session.close()


async def test_barge_in_mid_transcription_keeps_both_transcripts(responder, worker):
    held = Held(worker.model)
    worker.model = held
    session = responder.open_session("barge-in", TRANSCRIBED)
    stream = session.transcripts()
    speak(session, speech(1.2, seed=5))
    reply = session.respond()
    async for event in reply.events():
        if isinstance(event, AudioChunk):  # the user talks over the reply's first audio
            reply.cancel(played_ms=100.0)
    assert isinstance(event, ReplyDone) and event.reason == "cancelled"
    speak(session, speech(0.8, seed=6))
    second = await reply_events(session.respond())
    assert isinstance(second[-1], ReplyDone) and second[-1].reason == "stop"
    held.release.set()
    events = await transcript_events(stream, 2)
    assert [e.item for e in events if isinstance(e, TranscriptDone)] == [0, 1]  # in the order spoken
    assert check_transcript(events, 1).audio_ms == pytest.approx(800.0)
    await session.close()


async def test_hangup_mid_transcription_drops_the_job(responder, worker):
    held = Held(worker.model)
    worker.model = held
    session = responder.open_session("hangup", TRANSCRIBED)
    stream = session.transcripts()
    speak(session, speech(1.0, seed=7))
    assert await asyncio.to_thread(held.started.wait, WAIT_S)
    await session.close()
    held.release.set()  # the held job now sees a closed call: it stops and emits nothing
    assert [e async for e in stream] == []
    worker.model = held.real
    other = responder.open_session("after-hangup", TRANSCRIBED)  # the worker serves the next call
    speak(other, speech(1.0, seed=8))
    check_transcript(await transcript_events(other.transcripts(), 1), item=0)
    await other.close()


async def test_sessions_without_transcription_get_no_events(responder):
    session = responder.open_session("untranscribed", SessionSettings())
    stream = session.transcripts()
    speak(session, speech(1.0, seed=9))
    events = await reply_events(session.respond())
    assert isinstance(events[-1], ReplyDone)
    await settled(responder.engine)
    await session.close()
    assert [e async for e in stream] == []


def test_info_reports_the_transcription_stage(responder):
    details = responder.info().details
    assert (
        details["transcription"]["model"] == "whisper-random" and details["transcription"]["device"] == "cpu"
    )

"""The server drives any `pipeline.responder.Responder`: a scripted streaming responder at the vocoder's
22.05 kHz checks resampling, Timing merging, cancel with played ms, and that a failing turn only fails
that turn (text turns, so no speech is needed)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from pipeline.responder import (
    AudioChunk,
    Reply,
    ReplyDone,
    ReplyError,
    Responder,
    ResponderInfo,
    ResponderSession,
    SessionSettings,
    TextDelta,
    Timing,
)
from tests.helpers.rtc_client import RealtimeClient, start_server

RATE = 22_050  # GLM-4-Voice's vocoder rate
TONE_HZ = 440.0


class ScriptedTurn(Reply):
    def __init__(self, mode: str, log: list) -> None:
        self.reply_id = "t"
        self.mode = mode
        self.log = log
        self.cancelled = asyncio.Event()

    def cancel(self, played_ms: float | None = None) -> None:
        self.log.append(("cancel", played_ms))
        self.cancelled.set()

    async def events(self):
        yield Timing("prefill_done", time.monotonic())
        if self.mode == "raise":
            raise RuntimeError("engine exploded")
        if self.mode == "error":
            yield ReplyError("the model ran out of memory", code="engine_oom")
            return
        yield TextDelta("你好，")  # text deltas may be any UTF-8
        yield Timing("first_pcm", time.monotonic())
        t = np.arange(RATE // 5) / RATE  # 200 ms chunks, delivered faster than real time at first
        for i in range(15):  # 3 s in all
            if self.cancelled.is_set():
                yield ReplyDone("cancelled", "你好，")
                return
            yield AudioChunk((0.3 * np.sin(2 * np.pi * TONE_HZ * (t + i * 0.2))).astype(np.float32), RATE)
            await asyncio.sleep(0.1)
        yield TextDelta("world")
        yield ReplyDone("stop", "你好，world")


class ScriptedSession(ResponderSession):
    def __init__(self, log: list) -> None:
        self.log = log
        self.texts: list[str] = []

    def update(self, settings: SessionSettings) -> None:
        self.log.append(("update", settings.instructions))

    def push_audio(self, pcm16k) -> None:
        pass

    def commit_audio(self) -> None:
        pass

    def discard_audio(self) -> None:
        pass

    def add_text(self, text: str) -> None:
        self.texts.append(text)

    def respond(self) -> Reply:
        return ScriptedTurn(self.texts[-1] if self.texts else "speak", self.log)

    async def close(self) -> None:
        self.log.append(("close", None))


class ScriptedResponder(Responder):
    def __init__(self) -> None:
        self.log: list = []

    async def start(self) -> None:
        pass

    def open_session(self, call_id: str, settings: SessionSettings) -> ResponderSession:
        return ScriptedSession(self.log)

    def info(self) -> ResponderInfo:
        return ResponderInfo("scripted", True, RATE, {"weights": "demo"})

    async def stop(self) -> None:
        pass


@pytest.fixture
async def scripted():
    responder = ScriptedResponder()
    running = await start_server(responder=responder)
    yield running, responder
    await running.runner.cleanup()


def _say(client: RealtimeClient, text: str) -> int:
    mark = len(client.events)
    client.send(
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
        }
    )
    client.send({"type": "response.create"})
    return mark


async def test_any_rate_is_resampled_and_timings_merged(scripted):
    running, responder = scripted
    client = RealtimeClient(running.base_url)
    await client.connect()
    try:
        await client.wait_for("session.created", 5)
        mark = _say(client, "speak")
        started = await client.wait_for("output_audio_buffer.started", 5, after=mark)
        latency = await client.wait_for("glm4voice.turn.latency", 5, after=mark)
        assert latency["origin"] == "first_stage" and latency["speech_stopped_to_first_frame_ms"] is None
        assert {"prefill_done", "first_pcm", "first_frame_sent"} <= set(latency["stages_ms"])
        done = await client.wait_for("response.done", 10, after=mark)
        assert done["response"]["status"] == "completed"
        assert done["response"]["output"][0]["content"][0]["transcript"] == "你好，world"
        await client.wait_for("output_audio_buffer.stopped", 10, after=mark)
        heard = client.heard_pcm(client.event_time(started) - 0.1)
        frames = heard[: heard.size // 960 * 960].reshape(-1, 960)  # (n, 20 ms)
        loud_s = np.count_nonzero(np.sqrt(np.mean(frames**2, axis=1)) > 0.1) * 0.02  # the tone's RMS is 0.21
        assert loud_s == pytest.approx(3.0, abs=0.1), f"{loud_s:.2f} s of the 3 s reply were played"
        spectrum = np.abs(np.fft.rfft(heard[: 48_000 * 2]))
        assert np.argmax(spectrum) * 48_000 / (2 * 48_000) == pytest.approx(TONE_HZ, abs=2)  # 22.05 -> 48 kHz
        # /health shows the responder's details; the page gets the demo banner.
        async with __import__("aiohttp").ClientSession() as http:
            async with http.get(running.base_url + "/") as r:
                assert 'id="demo-banner"' in await r.text()
    finally:
        await client.hangup()
    assert ("close", None) in responder.log


async def test_cancel_while_generating_and_failing_turns(scripted):
    running, responder = scripted
    client = RealtimeClient(running.base_url)
    await client.connect()
    try:
        mark = _say(client, "speak")
        started = await client.wait_for("output_audio_buffer.started", 5, after=mark)
        await asyncio.sleep(0.5)
        client.send({"type": "response.cancel"})
        cleared = await client.wait_for("output_audio_buffer.cleared", 5, after=mark)
        cancelled = await client.wait_for("glm4voice.response.cancelled", 5, after=mark)
        done = await client.wait_for("response.done", 5, after=mark)
        assert cancelled["reason"] == "client_cancelled" and cancelled["still_generating"] is True
        assert done["response"]["status"] == "cancelled"
        elapsed_ms = (client.event_time(cleared) - client.event_time(started)) * 1000
        assert 0.5 * elapsed_ms < cancelled["played_ms"] < elapsed_ms + 100
        played = [ms for kind, ms in responder.log if kind == "cancel"]
        assert played and abs(played[0] - cancelled["played_ms"]) <= 1
        for mode, code in (("error", "engine_oom"), ("raise", "responder_error")):
            mark = _say(client, mode)
            error = await client.wait_for("error", 5, after=mark)
            done = await client.wait_for("response.done", 5, after=mark)
            assert error["error"]["code"] == code and done["response"]["status"] == "failed"
        mark = _say(client, "speak")  # the call goes on after failed turns
        assert (await client.wait_for("response.done", 10, after=mark))["response"]["status"] == "completed"
    finally:
        await client.hangup()

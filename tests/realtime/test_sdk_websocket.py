"""The WebSocket transport driven by the official `openai` Python SDK's Realtime client, unmodified:
`AsyncOpenAI(base_url=..., api_key=...).realtime.connect(model=...)` against an in-process echo server.

The echo responder plays a spoken turn back, so what comes back can be checked against what was said
(cross-correlation), in PCM 24 kHz and in G.711.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest
import soxr
from openai import AsyncOpenAI

from server.audio.codecs import decode_wire, encode_wire, wire_rate_hz
from tests.helpers.rtc_client import start_server, xcorr_peak
from tests.helpers.speech import ENGLISH_SENTENCES, have_speech_tools, synth_speech

assert have_speech_tools(), "espeak-ng and sox are needed (make test installs them)"

CHUNK_S = 0.1  # append 100 ms at a time, in real time
SILENCE_TAIL_S = 1.2  # more than silence_duration_ms: the turn ends
API_KEY = "sk-test-realtime"
SPOKEN_SEQUENCE = [
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed",
    "conversation.item.added",
    "conversation.item.done",
]
REPLY_SEQUENCE = [
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
]
STREAMED = {"response.output_audio.delta", "response.output_audio_transcript.delta"}


class Session:
    """The SDK connection plus every event received (as dicts, each also parsed by the SDK)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.events: list[dict] = []
        self.times: list[float] = []
        self._new = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            raw = await self.conn.recv_bytes()
            self.conn.parse_event(raw)  # the SDK's own types accept every event we send
            self.events.append(json.loads(raw))
            self.times.append(time.monotonic())
            self._new.set()

    async def wait_for(self, kind: str, timeout_s: float = 20.0, after: int = 0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events[after:]:
                if event["type"] == kind:
                    return event
            self._new.clear()
            await asyncio.wait_for(self._new.wait(), max(deadline - time.monotonic(), 0.001))

    def of_type(self, kind: str, after: int = 0) -> list[dict]:
        return [e for e in self.events[after:] if e["type"] == kind]

    def sequence(self, after: int = 0) -> list[str]:
        """Event types in order, without the streamed deltas and our glm4voice.* extras."""
        return [
            e["type"]
            for e in self.events[after:]
            if e["type"] not in STREAMED and not e["type"].startswith("glm4voice.")
        ]

    def audio(self, response_id: str, fmt: str) -> np.ndarray:
        data = b"".join(
            base64.b64decode(e["delta"])
            for e in self.of_type("response.output_audio.delta")
            if e["response_id"] == response_id
        )
        return decode_wire(data, fmt)

    async def stream(self, pcm16k: np.ndarray, fmt: str) -> None:
        """Append the clip plus a silent tail, encoded in `fmt`, in real time."""
        rate = wire_rate_hz(fmt)
        pcm = soxr.resample(
            np.concatenate([pcm16k, np.zeros(int(SILENCE_TAIL_S * 16_000), np.float32)]), 16_000, rate
        )
        step = int(CHUNK_S * rate)
        start = time.monotonic()
        for i, offset in enumerate(range(0, pcm.size, step)):
            data = encode_wire(pcm[offset : offset + step], fmt)
            await self.conn.input_audio_buffer.append(audio=base64.b64encode(data).decode("ascii"))
            await asyncio.sleep(max(start + (i + 1) * CHUNK_S - time.monotonic(), 0.0))

    def close(self) -> None:
        self._task.cancel()


@pytest.fixture
async def ws_server():
    running = await start_server(overrides={"auth": {"api_key": API_KEY}})
    try:
        yield running
    finally:
        await running.runner.cleanup()


def _client(server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


async def _spoken_turn(server, fmt: str) -> None:
    speech = synth_speech(ENGLISH_SENTENCES[0], voice="en")
    async with _client(server).realtime.connect(model="gpt-realtime") as conn:
        s = Session(conn)
        try:
            created = await s.wait_for("session.created", 5)
            assert created["session"]["audio"]["input"]["format"]["type"] == "audio/pcm"
            if fmt != "audio/pcm":
                await conn.session.update(
                    session={
                        "type": "realtime",
                        "audio": {"input": {"format": {"type": fmt}}, "output": {"format": {"type": fmt}}},
                    }
                )
                updated = await s.wait_for("session.updated", 5)
                assert updated["session"]["audio"]["output"]["format"] == {"type": fmt}
            mark = len(s.events)
            await s.stream(speech, fmt)
            done = await s.wait_for("response.done", 20, after=mark)
            assert s.of_type("error") == []
            seq = s.sequence(mark)
            assert seq == SPOKEN_SEQUENCE + REPLY_SEQUENCE, seq
            user = s.of_type("conversation.item.done", mark)[0]["item"]
            assert user["role"] == "user" and user["content"] == [{"type": "input_audio", "transcript": None}]
            assert s.of_type("input_audio_buffer.committed", mark)[0]["item_id"] == user["id"]
            response = done["response"]
            assert response["status"] == "completed" and response["output"][0]["role"] == "assistant"
            item_id = response["output"][0]["id"]
            added = s.of_type("response.output_item.added", mark)[0]
            assert added["item"]["id"] == item_id and added["item"]["status"] == "in_progress"
            deltas = s.of_type("response.output_audio.delta", mark)
            assert deltas and all(
                d["item_id"] == item_id and d["response_id"] == response["id"] for d in deltas
            )
            transcript = "".join(
                e["delta"] for e in s.of_type("response.output_audio_transcript.delta", mark)
            )
            assert transcript and response["output"][0]["content"][0]["transcript"] == transcript
            # Audio deltas: as long as the reply the echo says it made, and the clip that was spoken.
            heard = s.audio(response["id"], fmt)
            said_s = float(transcript.split("I heard ")[1].split(" s")[0])
            assert abs(heard.size / wire_rate_hz(fmt) - said_s) <= 0.06, (heard.size, said_s)
            reference = soxr.resample(speech, 16_000, wire_rate_hz(fmt))
            peak, _ = xcorr_peak(reference, heard)
            assert peak > 0.6, f"the reply's audio is not the spoken clip (xcorr peak {peak:.2f})"
        finally:
            s.close()
    await asyncio.sleep(0.2)
    assert server.server.calls == {}


async def test_spoken_turn_pcm24k(ws_server):
    await _spoken_turn(ws_server, "audio/pcm")


@pytest.mark.parametrize("fmt", ["audio/pcmu", "audio/pcma"])
async def test_spoken_turn_g711(ws_server, fmt):
    await _spoken_turn(ws_server, fmt)


async def test_typed_turn(ws_server):
    async with _client(ws_server).realtime.connect(model="gpt-realtime") as conn:
        s = Session(conn)
        try:
            await s.wait_for("session.created", 5)
            mark = len(s.events)
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hello there"}],
                }
            )
            await conn.response.create()
            done = await s.wait_for("response.done", 10, after=mark)
            seq = s.sequence(mark)
            assert seq == ["conversation.item.added", "conversation.item.done"] + REPLY_SEQUENCE, seq
            item = s.of_type("conversation.item.done", mark)[0]["item"]
            assert item["content"] == [{"type": "input_text", "text": "hello there"}]
            assert done["response"]["status"] == "completed"
            assert "hello there" in done["response"]["output"][0]["content"][0]["transcript"]
            await conn.send({"type": "conversation.item.retrieve", "item_id": item["id"]})
            retrieved = await s.wait_for("conversation.item.retrieved", 5, after=mark)
            assert retrieved["item"] == item
            assert s.of_type("error") == []
        finally:
            s.close()


async def test_cancel_then_truncate_keeps_what_was_heard(ws_server):
    speech = synth_speech(ENGLISH_SENTENCES[1], voice="en")
    async with _client(ws_server).realtime.connect(model="gpt-realtime") as conn:
        s = Session(conn)
        try:
            await s.wait_for("session.created", 5)
            await conn.session.update(
                session={
                    "type": "realtime",
                    "audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}},
                }
            )
            updated = await s.wait_for("session.updated", 5)
            assert updated["session"]["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
            await s.stream(speech, "audio/pcm")
            first = await s.wait_for("response.output_audio.delta", 20)
            await conn.response.cancel()  # the echo has finished generating: nothing to cancel, no crash
            await conn.output_audio_buffer.clear()  # WebRTC-only in the Realtime API: ignored here, no error
            done = await s.wait_for("response.done", 10)
            heard_ms = 1_000
            mark = len(s.events)
            await conn.conversation.item.truncate(
                item_id=first["item_id"], content_index=0, audio_end_ms=heard_ms
            )
            truncated = await s.wait_for("conversation.item.truncated", 5, after=mark)
            assert truncated["item_id"] == first["item_id"] and truncated["audio_end_ms"] == heard_ms
            assert done["response"]["output"][0]["id"] == first["item_id"]
            errors = [e["error"]["code"] for e in s.of_type("error")]
            assert errors in ([], ["response_cancel_not_active"]), errors
            # The next turn's prompt (the responder's history) keeps only the heard part of the reply.
            session = next(iter(ws_server.server.calls.values())).session
            assistant = [h for h in session.history if h.role == "assistant"]
            assert assistant[-1].audio_ms == heard_ms
        finally:
            s.close()


async def test_auth_and_admission(ws_server):
    bad = AsyncOpenAI(base_url=f"{ws_server.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(Exception) as failure:
        async with bad.realtime.connect(model="gpt-realtime") as conn:
            await conn.recv()
    assert "401" in str(failure.value)
    # A browser's subprotocol key.
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(
            f"{ws_server.base_url}/v1/realtime?model=x",
            protocols=("realtime", f"openai-insecure-api-key.{API_KEY}"),
        ) as ws:
            assert ws.protocol == "realtime"
            first = await ws.receive_json(timeout=5)
            assert first["type"] == "session.created"
        async with http.get(
            f"{ws_server.base_url}/v1/realtime", headers={"Authorization": f"Bearer {API_KEY}"}
        ) as r:
            assert r.status == 426  # not an upgrade

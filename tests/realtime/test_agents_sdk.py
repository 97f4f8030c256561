"""The OpenAI Agents SDK, unmodified: a `RealtimeAgent` run by `RealtimeRunner` over the SDK's own WebSocket
model, pointed at our server (demo weights, the transcription stage on: a tiny random Whisper, so the words
are babble and the events are the real ones). The SDK asks for input transcription by default and builds
the user's side of its history from `conversation.item.input_audio_transcription.completed`; one spoken
turn must leave a user message carrying the transcript our server sent, and the reply, in that history.
The SDK reports every event type it does not know as an `error`: it connects as it would to OpenAI, with
no parameter of ours, and must get none of our `glm4voice.*` events (docs/protocol.md "Extension
events")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import numpy as np
import pytest
from agents.realtime import RealtimeAgent, RealtimeRunner, RealtimeSession

from tests.helpers.rtc_client import RunningServer, glm_server_with_key
from tests.helpers.speech import ENGLISH_SENTENCES, have_speech_tools, synth_speech

assert have_speech_tools(), "espeak-ng and sox are needed (make test installs them)"

API_KEY = "sk-test-agents-sdk-key"
WIRE_RATE_HZ = 24_000  # the SDK's default pcm16 input and output
CHUNK_S = 0.02  # what a microphone hands over at a time
SILENCE_TAIL_S = 1.2  # more than the server VAD's 500 ms of silence: the turn ends
REPLY_TIMEOUT_S = 45.0  # the transcript and a whole reply on demo weights on a loaded 2-core CPU
TRANSCRIBED = "conversation.item.input_audio_transcription.completed"


@pytest.fixture
async def glm_ws_server(demo_dir) -> AsyncIterator[RunningServer]:
    async with glm_server_with_key(demo_dir, API_KEY, transcription="on") as running:
        yield running


def speech_pcm16(text: str) -> bytes:
    pcm = synth_speech(text, sample_rate_hz=WIRE_RATE_HZ)
    pcm = np.concatenate([pcm, np.zeros(int(SILENCE_TAIL_S * WIRE_RATE_HZ), np.float32)])
    return (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes()


async def speak(session: RealtimeSession, pcm16: bytes) -> None:
    """A microphone: 20 ms chunks in real time, the turn left to the server's VAD."""
    step = int(CHUNK_S * WIRE_RATE_HZ) * 2
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(pcm16), step)):
        await session.send_audio(pcm16[offset : offset + step])
        await asyncio.sleep(max(start + (i + 1) * CHUNK_S - time.monotonic(), 0.0))


class Seen:
    """What the session reported: the server's raw events, the SDK's errors, its latest history."""

    def __init__(self) -> None:
        self.raw: list[dict] = []
        self.sdk_errors: list[object] = []
        self.history: list = []
        self.added: list = []
        self.changed = asyncio.Event()

    async def until(self, condition: Callable[[], object], timeout_s: float, what: str) -> None:
        """Wait until `condition()` holds, checked at each session event; fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            self.changed.clear()
            left = deadline - time.monotonic()
            assert left > 0, f"timed out after {timeout_s:.0f} s waiting for {what}: {self.types()}"
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass

    def types(self) -> list[str]:
        return [e["type"] for e in self.raw]

    def transcripts(self) -> dict[str, str]:
        return {e["item_id"]: e["transcript"] for e in self.raw if e["type"] == TRANSCRIBED}

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.raw if e["type"] == kind]

    def replies(self) -> list:
        return [item for item in self.history if item.type == "message" and item.role == "assistant"]

    def settled(self) -> bool:
        """The reply is done, its transcript came, and the history has both with their final content."""
        return (
            bool(self.of_type("response.done") and self.transcripts())
            and set(user_transcripts(self.history)) == set(self.transcripts())
            and all(None not in parts for parts in user_transcripts(self.history).values())
            and [r.status for r in self.replies()] == ["completed"]
        )

    async def follow(self, session: RealtimeSession) -> None:
        async for event in session:
            if event.type == "raw_model_event" and event.data.type == "raw_server_event":
                self.raw.append(event.data.data)
            elif event.type == "error":
                self.sdk_errors.append(event.error)
            elif event.type == "history_updated":
                self.history = list(event.history)
            elif event.type == "history_added":
                self.added.append(event.item)
            self.changed.set()


def user_transcripts(items: list) -> dict[str, list[str | None]]:
    return {
        item.item_id: [getattr(part, "transcript", None) for part in item.content]
        for item in items
        if item.type == "message" and item.role == "user"
    }


async def test_agents_sdk_history_holds_the_users_transcript(glm_ws_server):
    agent = RealtimeAgent(name="assistant", instructions="You are a helpful voice assistant.")
    runner = RealtimeRunner(agent)
    ws_base = glm_ws_server.base_url.replace("http", "ws", 1)
    url = f"{ws_base}/v1/realtime?model=gpt-realtime"
    seen = Seen()
    # Transcription and server VAD are the SDK's defaults (gpt-4o-mini-transcribe, semantic_vad): not set.
    async with await runner.run(model_config={"url": url, "api_key": API_KEY}) as session:
        follower = asyncio.create_task(seen.follow(session))
        try:
            await speak(session, speech_pcm16(ENGLISH_SENTENCES[0]))
            await seen.until(
                lambda: seen.settled(), REPLY_TIMEOUT_S, "the transcript and the reply in the history"
            )
        finally:
            follower.cancel()

    assert seen.of_type("error") == [] and seen.sdk_errors == []
    assert not [kind for kind in seen.types() if kind.startswith("glm4voice.")]  # it did not ask for ours
    sent = seen.transcripts()
    assert len(sent) == 1 and "" not in sent.values()
    ((item_id, transcript),) = sent.items()
    assert user_transcripts(seen.history) == {item_id: [transcript]}
    assert item_id in user_transcripts(seen.added)  # history_added for the user's item too
    (reply,) = seen.replies()
    said = "".join(getattr(part, "transcript", None) or "" for part in reply.content)
    (done,) = seen.of_type("response.done")
    assert said != "" and said == "".join(
        p.get("transcript") or "" for p in done["response"]["output"][0]["content"]
    )
    ids = [item.item_id for item in seen.history]
    assert ids.index(item_id) < ids.index(reply.item_id)  # the turn, then the reply


async def test_extension_events_switch_refuses_bad_values(glm_ws_server):
    url = f"{glm_ws_server.base_url}/v1/realtime?glm4voice_events=maybe"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url, headers={"Authorization": f"Bearer {API_KEY}"})
    assert refused.value.status == 400

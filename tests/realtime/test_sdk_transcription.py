"""Transcripts of spoken turns over the WebSocket transport, driven by the official `openai` SDK, unmodified,
against an in-process server on demo weights with the transcription stage on (a tiny random Whisper: the
words are babble, the events and their order are the real ones)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from openai import AsyncOpenAI

from tests.helpers.engine import settled
from tests.helpers.rtc_client import RunningServer, glm_server_with_key
from tests.helpers.speech import ENGLISH_SENTENCES, have_speech_tools, synth_speech
from tests.realtime.test_sdk_websocket import API_KEY, Session

assert have_speech_tools(), "espeak-ng and sox are needed (make test installs them)"

T = "conversation.item.input_audio_transcription"


@pytest.fixture
async def glm_ws_server(demo_dir) -> AsyncIterator[RunningServer]:
    async with glm_server_with_key(demo_dir, API_KEY, transcription="on") as running:
        yield running


def transcription_of(s: Session, item_id: str, after: int) -> tuple[list[str], list[dict]]:
    """The item's transcription event types in order, and the events."""
    mine = [e for e in s.events[after:] if e["type"].startswith(T) and e["item_id"] == item_id]
    return [e["type"].removeprefix(T + ".") for e in mine], mine


async def test_spoken_turns_get_their_transcripts(glm_ws_server):
    speech = synth_speech(ENGLISH_SENTENCES[0], voice="en")
    client = AsyncOpenAI(base_url=f"{glm_ws_server.base_url}/v1", api_key=API_KEY, max_retries=0)
    async with client.realtime.connect(model="gpt-realtime") as conn:
        s = Session(conn)
        try:
            created = await s.wait_for("session.created", 10)
            assert created["session"]["audio"]["input"]["transcription"] is None  # off until asked for
            await conn.session.update(
                session={
                    "type": "realtime",
                    "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe", "language": "en"}}},
                }
            )
            updated = await s.wait_for("session.updated", 10)
            reported = updated["session"]["audio"]["input"]["transcription"]
            assert reported == {"model": "gpt-4o-transcribe", "language": "en", "prompt": ""}
            assert "audio.input.transcription" not in updated["session"]["glm4voice"]["ignored_fields"]

            mark = len(s.events)
            await s.stream(speech, "audio/pcm")
            committed = await s.wait_for("input_audio_buffer.committed", 20, after=mark)
            item_id = committed["item_id"]
            completed = await s.wait_for(f"{T}.completed", 60, after=mark)
            await s.wait_for("response.done", 60, after=mark)
            assert s.of_type("error", mark) == []
            kinds, events = transcription_of(s, item_id, mark)
            assert kinds[-1] == "completed" and set(kinds[:-1]) <= {"delta"} and kinds.count("completed") == 1
            assert completed["item_id"] == item_id and completed["content_index"] == 0
            assert "".join(e["delta"] for e in events[:-1]) == completed["transcript"] != ""
            assert completed["usage"]["type"] == "duration" and completed["usage"]["seconds"] > 0.5
            first = s.events.index(events[0])
            assert s.events.index(committed) < first  # the item exists before its transcript
            assert any(  # the user item was added before the transcript began
                e["type"] == "conversation.item.added" and e["item"]["id"] == item_id
                for e in s.events[:first]
            )
            await conn.send({"type": "conversation.item.retrieve", "item_id": item_id})
            retrieved = await s.wait_for("conversation.item.retrieved", 10, after=mark)
            part = retrieved["item"]["content"][0]
            assert part == {"type": "input_audio", "transcript": completed["transcript"]}

            # A failing transcriber: the item's failed event, and the reply goes on as before.
            worker = glm_ws_server.server.responder.engine.scheduler.transcription
            real = worker.model

            class Broken:
                name, device = real.name, real.device

                def transcribe(self, pcm16k, **kwargs):
                    raise RuntimeError("no words today")

            worker.model = Broken()
            try:
                mark = len(s.events)
                await s.stream(speech, "audio/pcm")
                item_id = (await s.wait_for("input_audio_buffer.committed", 20, after=mark))["item_id"]
                failed = await s.wait_for(f"{T}.failed", 60, after=mark)
                done = await s.wait_for("response.done", 60, after=mark)
            finally:
                worker.model = real
            assert failed["item_id"] == item_id and "no words today" in failed["error"]["message"]
            assert done["response"]["status"] == "completed"

            # The beta field turns it off again (null), and nothing more comes for the next turn.
            await conn.send({"type": "session.update", "session": {"input_audio_transcription": None}})
            updated = await s.wait_for("session.updated", 10, after=mark)
            assert updated["session"]["audio"]["input"]["transcription"] is None
            mark = len(s.events)
            await s.stream(speech, "audio/pcm")
            await s.wait_for("response.done", 60, after=mark)
            await settled(glm_ws_server.server.responder.engine)
            assert [e for e in s.events[mark:] if e["type"].startswith(T)] == []
        finally:
            s.close()
    await asyncio.sleep(0.2)
    assert glm_ws_server.server.calls == {}

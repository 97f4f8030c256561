"""GLM-4-Voice calls over loopback WebRTC, on demo weights: spoken and typed turns, barge-in, two calls.

What the assistant says is what the demo weights script (demo_script.json, written with the weights);
what the history must hold is computed from pipeline.lm.prompt and the reported played ms.
"""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np

from pipeline.lm.prompt import user_turn_ids
from pipeline.weights.demo import MESSAGE
from tests.helpers.engine import settled
from tests.helpers.rtc_client import RealtimeClient
from tests.helpers.speech import have_speech_tools, synth_speech

# make test installs espeak-ng and sox; their absence is a failure, not a skip.
assert have_speech_tools(), "espeak-ng and sox are needed (make test installs them)"
SILENCE_TAIL_S = 1.2  # more than silence_duration_ms: the turn ends
SPEECH_TOKEN_MS = 80.0


def engine_session(running, client):
    return running.server.calls[client.call_id].session


def transcript_of(client, response_id: str) -> str:
    return "".join(
        e["delta"]
        for e in client.of_type("response.output_audio_transcript.delta")
        if e["response_id"] == response_id
    )


async def reply_audio(client, started: dict, response_id: str, timeout_s: float = 30.0) -> np.ndarray:
    await client.wait_for("output_audio_buffer.stopped", timeout_s, after=client.events.index(started))
    await asyncio.sleep(0.3)  # the last frames are in flight
    return client.heard_pcm(client.event_time(started) - 0.1)


async def speak(client, pcm16k: np.ndarray) -> int:
    mark = len(client.events)
    client.mic.play(np.concatenate([pcm16k, np.zeros(int(SILENCE_TAIL_S * 16_000), np.float32)]), 16_000)
    return mark


async def test_spoken_turn_gives_text_and_audio(glm_server, script):
    client = RealtimeClient(glm_server.base_url)
    await client.connect()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{glm_server.base_url}/health") as r:
            health = await r.json()
        assert health["ready"] and health["responder"]["weights"] == "demo"
        assert health["responder"]["device"] == "cpu" and health["responder"]["dtype"] == "float32"
        mark = await speak(client, synth_speech("Hello, can you hear me?"))
        await client.wait_for("input_audio_buffer.speech_stopped", 20, after=mark)
        created = await client.wait_for("response.created", 10, after=mark)
        rid = created["response"]["id"]
        started = await client.wait_for("output_audio_buffer.started", 20, after=mark)
        heard = await reply_audio(client, started, rid)
        done = await client.wait_for("response.done", 10, after=mark)
        assert done["response"]["status"] == "completed"
        assert transcript_of(client, rid) == MESSAGE
        n_speech = len(script["speech_values"])
        assert heard.size / 48_000 >= 0.8 * n_speech * SPEECH_TOKEN_MS / 1000  # the whole reply was played
        assert float(np.sqrt(np.mean(heard**2))) > 1e-3  # not silence
        latency = next(e for e in client.of_type("glm4voice.turn.latency") if e["response_id"] == rid)
        for stage in (
            "tokens_ready",
            "prefill_done",
            "first_text_token",
            "first_speech_token",
            "first_pcm",
            "first_frame_sent",
        ):
            assert stage in latency["stages_ms"], stage
    finally:
        await client.hangup()


async def test_typed_turns_and_turn_two_prefills_only_new_tokens(glm_server, script):
    client = RealtimeClient(glm_server.base_url)
    await client.connect()
    try:
        session = engine_session(glm_server, client)
        tok = glm_server.server.responder.engine.scheduler.m.text
        for text in ["Hello there, typed message.", "And a second one."]:
            mark = len(client.events)
            client.send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": text}],
                    },
                }
            )
            client.send({"type": "response.create"})
            created = await client.wait_for("response.created", 10, after=mark)
            rid = created["response"]["id"]
            started = await client.wait_for("output_audio_buffer.started", 20, after=mark)
            heard = await reply_audio(client, started, rid)
            done = await client.wait_for("response.done", 10, after=mark)
            assert done["response"]["status"] == "completed"
            assert transcript_of(client, rid) == MESSAGE
            assert float(np.sqrt(np.mean(heard**2))) > 1e-3
        d = session.dialogue
        assert d.turn_prefilled_tokens[1] == len(user_turn_ids(tok, text="And a second one."))
        assert d.cache.length == len(d.history.ids())
    finally:
        await client.hangup()


async def test_barge_in_keeps_only_what_was_played(glm_server, script):
    client = RealtimeClient(glm_server.base_url)
    await client.connect()
    try:
        session = engine_session(glm_server, client)
        tok = glm_server.server.responder.engine.scheduler.m.text
        mark = await speak(client, synth_speech("Hello, can you hear me?"))
        started = await client.wait_for("output_audio_buffer.started", 30, after=mark)
        await asyncio.sleep(1.5)  # let part of the 6 s reply play, then talk over it
        mark = len(client.events)
        client.mic.play(synth_speech("Stop, stop. Wait a moment please."), 16_000)
        cancelled = await client.wait_for("glm4voice.response.cancelled", 10, after=mark)
        assert cancelled["response_id"] == started["response_id"]
        played_ms = cancelled["played_ms"]
        assert 500 < played_ms < 6000
        # the interruption is the next turn; once it has started, turn 1 in the history is what was heard
        await client.wait_for("response.created", 20, after=mark)
        await settled(glm_server.server.responder.engine)
        turn1 = session.dialogue.history.turns[0]
        header = [tok.assistant_id, *tok.encode("streaming_transcription\n")]
        # the event rounds played_ms to whole ms; the engine got the exact value: accept either side
        candidates = [heard_ids(script["reply_ids"], tok, played_ms + delta) for delta in (-0.5, 0.0, 0.5)]
        kept = next(
            (
                k
                for k in candidates
                if turn1[len(turn1) - len(k) :] == k
                and turn1[: len(turn1) - len(k)][-len(header) :] == header
            ),
            None,
        )
        assert kept is not None, "turn 1 in the history is not the user block + the heard part of the reply"
        assert 0 < len(kept) < len(script["reply_ids"])
    finally:
        await client.hangup()


async def test_two_concurrent_calls_both_get_replies(glm_server, script):
    clients = [RealtimeClient(glm_server.base_url) for _ in range(2)]
    await asyncio.gather(*(c.connect() for c in clients))
    try:
        speech = synth_speech("What time is it?")
        marks = [await speak(c, speech) for c in clients]

        async def one(client, mark):
            created = await client.wait_for("response.created", 30, after=mark)
            rid = created["response"]["id"]
            started = await client.wait_for("output_audio_buffer.started", 30, after=mark)
            heard = await reply_audio(client, started, rid)
            done = await client.wait_for("response.done", 10, after=mark)
            return rid, heard, done

        results = await asyncio.gather(*(one(c, m) for c, m in zip(clients, marks, strict=True)))
        for client, (rid, heard, done) in zip(clients, results, strict=True):
            assert done["response"]["status"] == "completed"
            assert transcript_of(client, rid) == MESSAGE
            assert float(np.sqrt(np.mean(heard**2))) > 1e-3
    finally:
        for c in clients:
            await c.hangup()


def heard_ids(reply_ids: list[int], tok, played_ms: float) -> list[int]:
    """Reference: the reply up to the last speech token the user heard (80 ms each)."""
    n = int(played_ms // SPEECH_TOKEN_MS)
    seen = 0
    for i, t in enumerate(reply_ids):
        seen += tok.is_audio(t)
        if n and seen == n:
            return reply_ids[: i + 1]
    return [] if n == 0 else list(reply_ids)


async def test_resumed_call_prefills_only_the_new_turn(glm_server, script):
    """Resume (docs/protocol.md): drop the network path mid-conversation (the client's peer connection closed,
    no hangup), reconnect with the resume token: the next turn's prompt holds the earlier turn, and only the
    new user block is prefilled (the KV cache survived the drop)."""
    from server.call.resume import RESUME_HEADER

    tok = glm_server.server.responder.engine.scheduler.m.text
    first = RealtimeClient(glm_server.base_url)
    await first.connect()
    token = (await first.wait_for("session.created", 5))["resume_token"]
    session = engine_session(glm_server, first)
    mark = len(first.events)
    first.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hello."}],
            },
        }
    )
    first.send({"type": "response.create"})
    await first.wait_for("response.done", 30, after=mark)
    old = glm_server.server.calls[first.call_id]
    await first.close()  # the network path goes: no hangup
    await old.closed.wait()
    await settled(glm_server.server.responder.engine)
    d = session.dialogue
    assert not d.closed and len(d.history.turns) == 1
    kept_ids = len(d.history.ids())
    second = RealtimeClient(glm_server.base_url, headers={RESUME_HEADER: token})
    await second.connect()
    try:
        await second.wait_for("glm4voice.session.resumed", 5)
        assert engine_session(glm_server, second) is session
        text = "And a second one."
        mark = len(second.events)
        second.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                },
            }
        )
        second.send({"type": "response.create"})
        started = await second.wait_for("output_audio_buffer.started", 30, after=mark)
        heard = await reply_audio(second, started, started["response_id"])
        assert float(np.sqrt(np.mean(heard**2))) > 1e-3
        assert (await second.wait_for("response.done", 10, after=mark))["response"]["status"] == "completed"
        assert len(d.history.turns) == 2
        assert d.turn_prompt_lengths[1] == kept_ids + len(
            user_turn_ids(tok, text=text)
        )  # the earlier turn is in it
        assert d.turn_prefilled_tokens[1] == len(
            user_turn_ids(tok, text=text)
        )  # ... and was not prefilled again
        assert d.cache.length == len(d.history.ids())
    finally:
        await second.hangup()

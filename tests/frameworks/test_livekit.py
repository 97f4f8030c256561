"""LiveKit Agents' OpenAI `RealtimeModel`, unmodified, without a room: the model's session driven as an
`AgentSession` drives it, pointed at our WebSocket transport (demo weights).

One session: a greeting (`generate_reply` with instructions and no user input), a spoken turn (server
VAD), a typed turn (`update_chat_ctx` with a new user message, then `generate_reply`), and an interrupt
while a reply plays (`interrupt` + `truncate`). Every step must end without an `error` event from the
server, without an error emitted or logged by the plugin, and within its deadline (the plugin's own:
5 s for `update_chat_ctx`, 10 s for `generate_reply`'s `response.created`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from livekit import rtc
from livekit.agents import llm
from livekit.plugins import openai as lk_openai

from tests.frameworks.conftest import API_KEY, REPLY_TIMEOUT_S, WIRE_RATE_HZ, errors, speech_pcm16

FRAME_MS = 20


async def play(generation: llm.GenerationCreatedEvent, stop_after_audio_ms: float | None = None) -> dict:
    """Read a generation as the agent's audio output would: every message's audio and text, to its end
    (which the plugin reaches on response.done); with `stop_after_audio_ms`, only until that much audio
    arrived (`drain` reads the rest)."""
    heard = {"audio_ms": 0.0, "text": "", "messages": []}
    async for message in generation.message_stream:
        heard["messages"].append(message)
        async for frame in message.audio_stream:
            heard["audio_ms"] += 1000.0 * frame.samples_per_channel / frame.sample_rate
            if stop_after_audio_ms is not None and heard["audio_ms"] >= stop_after_audio_ms:
                return heard
        heard["text"] += "".join([str(delta) async for delta in message.text_stream])
    return heard


async def drain(generation: llm.GenerationCreatedEvent, heard: dict) -> None:
    """The rest of a generation `play` stopped reading, to its end."""
    for message in heard["messages"]:
        [_ async for _ in message.audio_stream]
        [_ async for _ in message.text_stream]
    [_ async for _ in generation.message_stream]


async def speak(session, pcm16: bytes) -> None:
    """A microphone: 20 ms frames at 24 kHz, in real time."""
    samples = WIRE_RATE_HZ * FRAME_MS // 1000
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(pcm16), samples * 2)):
        chunk = pcm16[offset : offset + samples * 2]
        session.push_audio(
            rtc.AudioFrame(
                data=chunk, sample_rate=WIRE_RATE_HZ, num_channels=1, samples_per_channel=len(chunk) // 2
            )
        )
        await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_MS / 1000 - time.monotonic()))


@pytest.mark.timeout(300)
async def test_livekit_realtime_session(glm_ws, sent, caplog):
    caplog.set_level(logging.WARNING, logger="livekit")
    model = lk_openai.realtime.RealtimeModel(base_url=f"{glm_ws.base_url}/v1", api_key=API_KEY)
    session = model.session()
    emitted: list[llm.RealtimeModelError] = []
    generations: asyncio.Queue[llm.GenerationCreatedEvent] = asyncio.Queue()
    session.on("error", emitted.append)
    session.on("generation_created", generations.put_nowait)

    def check(step: str) -> None:
        assert not errors(sent), f"{step}: the server sent {errors(sent)}"
        assert not emitted, f"{step}: the plugin emitted {emitted}"
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert not logged, f"{step}: the plugin logged {logged}"

    try:
        await session.update_instructions("You are a friendly voice assistant.")

        # 1. A greeting: no user input, instructions for this reply only.
        greeting = await session.generate_reply(instructions="Greet the user.")
        assert greeting.user_initiated
        heard = await asyncio.wait_for(play(greeting), REPLY_TIMEOUT_S)
        check("greeting")
        assert heard["audio_ms"] > 0 and heard["text"]
        await generations.get()  # the same generation, also announced

        # 2. A spoken turn: the server's VAD ends it and creates the reply.
        await speak(session, speech_pcm16("What is the weather like today?"))
        spoken = await asyncio.wait_for(generations.get(), REPLY_TIMEOUT_S)
        heard = await asyncio.wait_for(play(spoken), REPLY_TIMEOUT_S)
        check("spoken turn")
        assert heard["audio_ms"] > 0

        # 3. A typed turn: the chat context gains a user message (the client's id, after the last item).
        chat_ctx = session.chat_ctx.copy()
        message = chat_ctx.add_message(role="user", content="Tell me about rivers.")
        await session.update_chat_ctx(chat_ctx)  # raises after 5 s without the item's conversation.item.added
        assert session.chat_ctx.get_by_id(message.id) is not None
        typed = await session.generate_reply()
        assert typed.user_initiated
        heard = await asyncio.wait_for(play(typed), REPLY_TIMEOUT_S)
        await generations.get()
        check("typed turn")
        assert heard["audio_ms"] > 0
        ids = [item.id for item in session.chat_ctx.items]
        assert ids.index(message.id) == len(ids) - 2  # the reply follows the typed message

        # 4. Interrupt: the agent cuts the next reply off after 200 ms of its audio, as a barge-in would.
        reply = await session.generate_reply(instructions="Tell a long story.")
        await generations.get()
        heard = await asyncio.wait_for(play(reply, stop_after_audio_ms=200.0), REPLY_TIMEOUT_S)
        session.interrupt()
        message_id = heard["messages"][0].message_id
        session.truncate(message_id=message_id, modalities=["audio", "text"], audio_end_ms=200)
        await asyncio.wait_for(drain(reply, heard), REPLY_TIMEOUT_S)  # the plugin saw response.done
        await sent.until(lambda: sent.of_type("conversation.item.truncated"), REPLY_TIMEOUT_S, "the truncate")
        check("interrupt")
        assert sent.of_type("response.done")[-1]["response"]["status"] in ("cancelled", "completed")
        assert not session.has_active_generation
    finally:
        await session.aclose()
        await model.aclose()

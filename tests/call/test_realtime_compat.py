"""What unmodified Realtime WebRTC clients send and expect (docs/protocol.md, compatibility): the full GA
session config, cancel followed by clear, the item lifecycle event by event, a cut-off reply whose responder
finished first, a cross-origin preflight with the client libraries' own headers, and a control connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import numpy as np

from pipeline.responder import (
    AudioChunk,
    Reply,
    ReplyDone,
    ReplyEvent,
    Responder,
    ResponderInfo,
    ResponderSession,
    SessionSettings,
    TextDelta,
)
from tests.helpers.rtc_client import RealtimeClient, start_server

RATE = 22_050
WORDS = [f"word{i} " for i in range(40)]
GA_SESSION = {  # what a Realtime client library sends by default (agents SDK shape)
    "type": "realtime",
    "model": "gpt-realtime",
    "instructions": "Be brief.",
    "output_modalities": ["audio"],
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "noise_reduction": None,
            "transcription": {"model": "gpt-4o-mini-transcribe"},
            "turn_detection": {
                "type": "semantic_vad",
                "eagerness": "medium",
                "create_response": True,
                "interrupt_response": True,
            },
        },
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0},
    },
    "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
    "tool_choice": "auto",
    "tracing": "auto",
    "include": [],
    "prompt": None,
    "truncation": "auto",
    "max_output_tokens": "inf",
}
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


class DeafTurn(Reply):
    """Finishes its whole reply whatever cancel says: the engine that had generated everything before the
    cancel reached it (a race a real client hit: the reply was complete when the cancel arrived). 100 ms of
    audio per word."""

    def __init__(self) -> None:
        self.reply_id = "deaf"
        self.cancels: list[float | None] = []

    def cancel(self, played_ms: float | None = None) -> None:
        self.cancels.append(played_ms)

    def heard_transcript(self, played_ms: float) -> str | None:
        return "".join(WORDS[: int(played_ms // 100)])

    async def events(self) -> AsyncIterator[ReplyEvent]:
        for word in WORDS:
            yield TextDelta(word)
            yield AudioChunk(np.full(RATE // 10, 0.1, np.float32), RATE)
            await asyncio.sleep(0.01)
        yield ReplyDone("stop", "".join(WORDS))


class DeafSession(ResponderSession):
    def __init__(self, turns: list[DeafTurn]) -> None:
        self.turns = turns

    def update(self, settings: SessionSettings) -> None: ...
    def push_audio(self, pcm16k: np.ndarray) -> None: ...
    def commit_audio(self) -> None: ...
    def discard_audio(self) -> None: ...
    def add_text(self, text: str) -> None: ...

    def respond(self) -> Reply:
        self.turns.append(DeafTurn())
        return self.turns[-1]

    async def close(self) -> None: ...


class DeafResponder(Responder):
    def __init__(self) -> None:
        self.turns: list[DeafTurn] = []

    async def start(self) -> None: ...

    def open_session(self, call_id: str, settings: SessionSettings) -> ResponderSession:
        return DeafSession(self.turns)

    def info(self) -> ResponderInfo:
        return ResponderInfo("deaf", True, RATE)

    async def stop(self) -> None: ...


def _sequence(client: RealtimeClient, after: int) -> list[str]:
    return [
        e["type"]
        for e in client.events[after:]
        if not e["type"].startswith(("glm4voice.", "output_audio_buffer"))
        and not e["type"].endswith(".delta")
    ]


async def test_ga_session_config_typed_turn_lifecycle_and_cancel_clear(echo_server):
    client = RealtimeClient(echo_server.base_url)
    await client.connect()
    try:
        await client.wait_for("session.created", 5)
        client.send({"type": "session.update", "session": GA_SESSION})
        updated = await client.wait_for("session.updated", 5)
        session = updated["session"]
        assert session["instructions"] == "Be brief."
        td = session["audio"]["input"]["turn_detection"]
        assert td["type"] == "semantic_vad" and td["eagerness"] == "medium"
        assert {
            "model",
            "tools",
            "tool_choice",
            "tracing",
            "audio.output.voice",
            "audio.input.transcription",
            "audio.input.noise_reduction",
        } <= set(session["glm4voice"]["ignored_fields"])
        mark = len(client.events)
        client.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hello"}],
                },
            }
        )
        client.send({"type": "response.create"})
        done = await client.wait_for("response.done", 10, after=mark)
        seq = _sequence(client, mark)
        assert seq == ["conversation.item.added", "conversation.item.done"] + REPLY_SEQUENCE, seq
        assistant_added = [e for e in client.events[mark:] if e["type"] == "conversation.item.added"][1]
        assert (
            assistant_added["previous_item_id"]
            == [e for e in client.events[mark:] if e["type"] == "conversation.item.done"][0]["item"]["id"]
        )
        assert done["response"]["output"][0]["id"] == assistant_added["item"]["id"]
        # Interrupt as client libraries do: cancel, then clear - twice, with nothing playing the second time.
        for _ in range(2):
            client.send({"type": "response.cancel"})
            client.send({"type": "output_audio_buffer.clear"})
        client.send({"type": "glm4voice.ping", "event_id": "evt_sync"})
        await client.wait_for("glm4voice.pong", 5)
        codes = [e["error"]["code"] for e in client.of_type("error")]
        assert (
            "response_cancel_not_active" in codes or codes == []
        )  # cancel with no reply, as the Realtime API
        assert all(code == "response_cancel_not_active" for code in codes), codes
    finally:
        await client.hangup()


async def test_cancel_after_the_responder_finished_reports_what_was_heard():
    responder = DeafResponder()
    server = await start_server(responder)
    client = RealtimeClient(server.base_url)
    try:
        await client.connect()
        client.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "talk"}],
                },
            }
        )
        client.send({"type": "response.create"})
        await client.wait_for("output_audio_buffer.started", 10)
        await asyncio.sleep(0.35)  # some audio plays
        client.send({"type": "response.cancel"})
        cancelled = await client.wait_for("glm4voice.response.cancelled", 5)
        done = await client.wait_for("response.done", 5)
        response = done["response"]
        assert response["status"] == "cancelled", response
        assert response["status_details"]["reason"] == "client_cancelled"
        heard = response["output"][0]["content"][0]["transcript"]
        assert heard == responder.turns[0].heard_transcript(cancelled["played_ms"])
        assert len(heard) < len("".join(WORDS))
        assert response["output"][0]["status"] == "incomplete"
        assert responder.turns[0].cancels == [cancelled["played_ms"]]
    finally:
        await client.hangup()
        await server.runner.cleanup()


async def test_preflight_with_client_library_headers():
    server = await start_server(overrides={"http": {"cors_origins": ["https://app.example.com"]}})
    requested = (
        "authorization, content-type, x-openai-agents-sdk, openai-beta, openai-organization, openai-project"
    )
    try:
        async with aiohttp.ClientSession() as http:
            for origin, status in (("https://app.example.com", 204), ("https://evil.example.net", 403)):
                async with http.options(
                    f"{server.base_url}/v1/realtime/calls",
                    headers={
                        "Origin": origin,
                        "Access-Control-Request-Method": "POST",
                        "Access-Control-Request-Headers": requested,
                    },
                ) as r:
                    assert r.status == status
                    if status == 204:
                        allowed = {
                            h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")
                        }
                        assert set(requested.split(", ")) <= allowed
                        assert r.headers["Access-Control-Allow-Origin"] == origin
                    else:
                        assert "Access-Control-Allow-Origin" not in r.headers
    finally:
        await server.runner.cleanup()


async def test_control_connection_steers_a_webrtc_call(echo_server):
    client = RealtimeClient(echo_server.base_url)
    await client.connect()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{echo_server.base_url}/v1/realtime?call_id={client.call_id}") as ws:
                await ws.send_json(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": "from the backend"}],
                        },
                    }
                )
                await ws.send_json({"type": "response.create"})
                seen = []
                while "response.done" not in seen:
                    seen.append((await ws.receive_json(timeout=10))["type"])
                await ws.send_json({"type": "input_audio_buffer.commit"})
                refused = await ws.receive_json(timeout=5)
                while refused["type"] != "error":
                    refused = await ws.receive_json(timeout=5)
                assert refused["error"]["code"] == "unsupported_value"
        done = await client.wait_for("response.done", 5)  # the browser's call got the reply too
        assert "from the backend" in done["response"]["output"][0]["content"][0]["transcript"]
        async with aiohttp.ClientSession() as http:
            async with http.get(
                f"{echo_server.base_url}/v1/realtime?call_id=rtc_nope",
                headers={
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZQ==",
                },
            ) as r:
                assert r.status == 404
    finally:
        await client.hangup()

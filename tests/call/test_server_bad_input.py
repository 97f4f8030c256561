"""Bad input gets a clear error and the server keeps serving: HTTP signalling and data-channel events."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest

from tests.helpers.rtc_client import RealtimeClient, make_offer, start_server


def _without_opus(sdp: str) -> str:
    opus = re.search(r"^a=rtpmap:(\d+) opus/48000", sdp, re.MULTILINE | re.IGNORECASE).group(1)
    lines = [line for line in sdp.splitlines() if not re.match(rf"^a=(rtpmap|fmtp|rtcp-fb):{opus}\b", line)]
    lines = [
        re.sub(
            r"^(m=audio \d+ \S+)(.*)",
            lambda m: m.group(1) + " " + " ".join(p for p in m.group(2).split() if p != opus),
            line,
        )
        for line in lines
    ]
    return "\r\n".join(lines) + "\r\n"


async def _post(base: str, data, content_type: str | None, path: str = "/v1/realtime/calls"):
    headers = {"Content-Type": content_type} if content_type else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(base + path, data=data, headers=headers) as r:
            text = await r.text()
            return r.status, (json.loads(text) if r.content_type == "application/json" else text), r.headers


@pytest.fixture
async def server():
    running = await start_server(
        overrides={
            "http": {"max_body_bytes": 20_000},
            "limits": {"max_event_bytes": 20_000, "max_text_chars": 500, "max_instructions_chars": 800},
        }
    )
    yield running
    await running.runner.cleanup()


async def test_signalling_errors_are_clear_and_server_keeps_serving(server):
    base = server.base_url
    good = await make_offer()
    cases = [
        ("garbage", b"hello there", "application/sdp", 400, "invalid_sdp"),
        ("empty", b"", "application/sdp", 400, "invalid_sdp"),
        (
            "json-as-sdp",
            json.dumps({"sdp": good, "type": "offer"}).encode(),
            "application/sdp",
            400,
            "invalid_sdp",
        ),
        ("sdp-as-json", good.encode(), "application/json", 400, "invalid_json"),
        ("json-without-sdp", b'{"type": "offer"}', "application/json", 400, "missing_required_parameter"),
        (
            "json-answer",
            json.dumps({"sdp": good, "type": "answer"}).encode(),
            "application/json",
            400,
            "invalid_value",
        ),
        (
            "json-bad-session",
            json.dumps({"sdp": good, "session": {"instructions": 5}}).encode(),
            "application/json",
            400,
            "invalid_value",
        ),
        ("text-plain", good.encode(), "text/plain", 415, "unsupported_media_type"),
        ("no-content-type", good.encode(), None, 415, "unsupported_media_type"),
        ("not-utf8", b"v=0\r\n\xff\xfe", "application/sdp", 400, "invalid_body"),
        ("video-only", (await make_offer(video_only=True)).encode(), "application/sdp", 400, "no_audio"),
        ("no-opus", _without_opus(good).encode(), "application/sdp", 400, "no_opus"),
        (
            "broken-sdp",
            b"v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n",
            "application/sdp",
            400,
            "invalid_sdp",
        ),
        ("oversized", b"v=0\r\n" + b"a=x\r\n" * 10_000, "application/sdp", 413, "body_too_large"),
    ]
    for name, body, content_type, status, code in cases:
        got_status, got, _ = await _post(base, body, content_type)
        assert got_status == status, (name, got)
        assert got["error"]["code"] == code, (name, got)
        assert got["error"]["message"], name

    async def chunked():  # no Content-Length: the limit applies while reading
        for _ in range(100):
            yield b"a=padding-line-padding-line-padding-line\r\n" * 10

    got_status, got, _ = await _post(base, chunked(), "application/sdp")
    assert (got_status, got["error"]["code"]) == (413, "body_too_large")
    got_status, got, _ = await _post(base, b"", None, path="/v1/realtime/calls/rtc_nope/hangup")
    assert (got_status, got["error"]["code"]) == (404, "call_not_found")
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/no/such/page") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with http.get(base + "/v1/realtime/calls") as r:
            assert r.status == 405
    assert server.server.calls == {}, "a refused offer left a call behind"
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("session", "{}")
    got_status, got, _ = await _post(base, form, None)
    assert (got_status, got["error"]["code"]) == (400, "missing_required_parameter")
    # ... and a good call still works, in all three forms.
    for form in ("sdp", "json", "multipart"):
        client = RealtimeClient(base)
        session = {"instructions": "Speak slowly."} if form != "sdp" else None
        await client.connect(as_json=form == "json", as_form=form == "multipart", session=session)
        created = await client.wait_for("session.created", 5)
        assert created["session"]["instructions"] == ("Speak slowly." if session else "")
        assert await client.hangup() == 200
    assert server.server.calls == {}


async def test_data_channel_errors_and_text_turn(server):
    client = RealtimeClient(server.base_url)
    await client.connect()
    try:
        await client.wait_for("session.created", 5)
        limit = server.server.config.limits.max_event_bytes
        bad = [
            ("not json", "invalid_json"),
            ("[1, 2]", "invalid_event"),
            (json.dumps({"no": "type"}), "missing_required_parameter"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}), "unknown_event"),
            (json.dumps({"type": "made.up", "event_id": "evt_1"}), "unknown_event"),
            (json.dumps({"type": "session.update"}), "missing_required_parameter"),
            (
                json.dumps({"type": "session.update", "session": {"turn_detection": {"threshold": 7}}}),
                "invalid_value",
            ),
            (
                json.dumps({"type": "session.update", "session": {"turn_detection": {"type": "word_vad"}}}),
                "unsupported_value",
            ),
            (
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"turn_detection": {"type": "semantic_vad", "eagerness": "eager"}},
                    }
                ),
                "invalid_value",
            ),
            (
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
                    }
                ),
                "invalid_value",
            ),
            (
                json.dumps({"type": "conversation.item.retrieve", "item_id": "item_nope"}),
                "item_retrieve_invalid_item_id",
            ),
            (json.dumps({"type": "session.update", "session": {"temperature": "hot"}}), "invalid_value"),
            (
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {"type": "function_call", "name": "lookup", "arguments": "{}"},
                    }
                ),
                "unsupported_value",
            ),
            (
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {"role": "user", "content": [{"type": "input_text", "text": "  "}]},
                    }
                ),
                "invalid_value",
            ),
            (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
            (
                json.dumps({"type": "session.update", "session": {"instructions": "x" * (limit + 10)}}),
                "message_too_large",
            ),
            (
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "message",
                            "role": "user",
                            "content": [
                                {
                                    "type": "input_text",
                                    "text": "y" * (server.server.config.limits.max_text_chars + 1),
                                }
                            ],
                        },
                    }
                ),
                "string_above_max_length",
            ),
            (
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "instructions": "z" * (server.server.config.limits.max_instructions_chars + 1)
                        },
                    }
                ),
                "string_above_max_length",
            ),
            (b"\x00\x01binary", "invalid_event"),
            ("[" * 100_000, "message_too_large"),
        ]
        for message, code in bad:
            mark = len(client.events)
            if isinstance(message, bytes):
                client.channel.send(message)
            else:
                client.send(message)
            error = await client.wait_for("error", 5, after=mark)
            assert error["error"]["code"] == code, (message[:60], error)
        assert client.of_type("error")[4]["error"]["event_id"] == "evt_1"  # errors name the client's event
        # The call still works: update the session, then a typed turn gets a reply.
        mark = len(client.events)
        client.send(
            {
                "type": "session.update",
                "session": {
                    "instructions": "Be brief.",
                    "audio": {
                        "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 700}}
                    },
                },
            }
        )
        updated = await client.wait_for("session.updated", 5, after=mark)
        assert updated["session"]["instructions"] == "Be brief."
        assert updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 700
        client.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hello there"}],
                },
            }
        )
        client.send({"type": "response.create"})
        done = await client.wait_for("response.done", 5, after=mark)
        assert "hello there" in done["response"]["output"][0]["content"][0]["transcript"]
    finally:
        await client.hangup()


async def test_admission_limit_answers_503_with_retry_after():
    running = await start_server(overrides={"limits": {"max_calls": 1, "retry_after_s": 7}})
    try:
        first = RealtimeClient(running.base_url)
        await first.connect()
        status, body, headers = await _post(running.base_url, await make_offer(), "application/sdp")
        assert status == 503 and body["error"]["code"] == "server_full" and headers["Retry-After"] == "7"
        async with aiohttp.ClientSession() as http:
            async with http.get(running.base_url + "/health") as r:
                health = await r.json()
            async with http.get(running.base_url + "/metrics") as r:
                metrics = await r.text()
        assert (
            health["ready"] is True and health["active_calls"] == 1 and health["responder"]["name"] == "echo"
        )
        assert "glm4voice_active_calls 1.0" in metrics
        assert "glm4voice_event_loop_lag_seconds_count" in metrics
        assert 'glm4voice_calls_rejected_total{reason="server_full"} 1.0' in metrics
        await first.hangup()
        await asyncio.sleep(0)
        assert running.server.calls == {}
    finally:
        await running.runner.cleanup()

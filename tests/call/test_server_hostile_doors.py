"""Hostile clients at every door (docs/robustness.md, "Hostile clients: every door"): WebSocket append
floods, control connections, history edits, data-channel labels, client secrets, refused connections,
small protocol points. Resumes and parked calls are in tests/call/test_server_resume.py."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

import aiohttp
import pytest

from pipeline.responder import SamplingSettings
from server.call.guard import MESSAGE_BURST, MESSAGE_BYTES_BURST
from server.realtime import protocol as P
from server.realtime import session_update
from server.webrtc.transport import LOGGED_LABEL_CHARS, MAX_OTHER_CHANNELS
from tests.call.test_call_seam import FakeTransport, _call, _settle
from tests.helpers.rtc_client import RealtimeClient, start_server

KEY = "test-key-0123456789"


def _ws_url(running) -> str:
    return "ws" + running.base_url[len("http") :] + "/v1/realtime"


def _errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize(
    "audio",
    [
        base64.b64encode(b"\0\0").decode(),  # tiny: 1 sample
        "",  # empty: no audio at all
        "!!!!",  # not base64
        base64.b64encode(bytes(700_000)).decode(),  # ~0.9 MB a message
    ],
    ids=["tiny", "empty", "invalid", "large"],
)
async def test_a_websocket_append_flood_is_dropped_then_ends_the_call(audio, caplog):
    """Appends past the message count or byte rate are dropped unread with at most one error a second;
    a flood lasting `inbound_flood_s` ends the call as over WebRTC: an `error` and
    `glm4voice.call.closing` (inbound_flood), then the socket closes (1008) with the reason."""
    running = await start_server(overrides={"limits": {"inbound_flood_s": 1.0}})
    message = json.dumps({"type": "input_audio_buffer.append", "audio": audio})
    events: list[dict] = []
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(_ws_url(running), params={"glm4voice_events": "on"}, max_msg_size=0) as ws,
        ):

            async def read() -> None:
                async for msg in ws:
                    events.append(json.loads(msg.data))

            reader = asyncio.ensure_future(read())
            t0, sent = time.monotonic(), 0
            while not reader.done() and time.monotonic() - t0 < 10:
                try:
                    await ws.send_str(message)
                except ConnectionError:
                    break
                sent += 1
                if sent % 50 == 0:
                    await asyncio.sleep(0)
            await asyncio.wait_for(reader, 5)
            elapsed_s = time.monotonic() - t0
            assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        assert sent > MESSAGE_BURST or sent * len(message) > MESSAGE_BYTES_BURST  # the case under test
        errors = [e["error"]["code"] for e in events if e["type"] == "error"]
        assert errors[-1] == "inbound_flood"
        assert len(errors) <= elapsed_s + 3, errors  # one a second, not one per append
        closing = [e for e in events if e["type"] == "glm4voice.call.closing"]
        assert [e["reason"] for e in closing] == ["inbound_flood"]
        assert not running.server.calls
        assert not _errors(caplog)
    finally:
        await running.runner.cleanup()


async def test_control_connections_share_the_calls_budget_and_count_as_activity(caplog):
    """A control connection's events take the call's own budget (new instructions: the expensive rate),
    keep the call from its idle timeout, and wrong keys are refused by the per-address rate."""
    limits = {"idle_timeout_s": 2.0, "calls_per_minute_per_address": 6, "call_burst_per_address": 4}
    running = await start_server(overrides={"limits": limits, "auth": {"api_key": KEY}})
    auth = {"Authorization": f"Bearer {KEY}"}
    client = RealtimeClient(running.base_url, headers=auth)
    caplog.set_level(logging.INFO)
    try:
        await client.connect(listen_only=True)
        url = f"{_ws_url(running)}?call_id={client.call_id}"
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=auth) as ws:
            for i in range(10):
                await ws.send_json({"type": "session.update", "session": {"instructions": f"be brief {i}"}})
            answers = []
            while len(answers) < 10:
                event = json.loads((await ws.receive(timeout=5)).data)
                if event["type"] in ("session.updated", "error"):
                    answers.append(event)
            codes = [e["error"]["code"] for e in answers if e["type"] == "error"]
            burst = running.server.config.limits.expensive_event_burst
            assert len(answers) - len(codes) == burst and set(codes) == {"rate_limited"}
            for _ in range(8):  # 4 s of steering (no speech, no data-channel event) outlast idle_timeout_s
                await ws.send_json({"type": "session.update", "session": {"temperature": 0.7}})
                await asyncio.sleep(0.5)
            assert client.call_id in running.server.calls
        refused = []
        async with aiohttp.ClientSession() as http:
            for i in range(8):
                try:
                    await http.ws_connect(url, headers={"Authorization": f"Bearer wrong-{i}"})
                except aiohttp.WSServerHandshakeError as exc:
                    refused.append(exc.status)
        assert 429 in refused and refused.count(401) <= 4  # the rest never reach the key check
        refusal_lines = [r for r in caplog.records if getattr(r, "response_status", 0) in (401, 429)]
        assert 1 <= len(refusal_lines) <= 2  # the access log: one line per kind of refusal per 10 s
        assert not _errors(caplog)
    finally:
        await client.hangup()
        await running.runner.cleanup()


async def test_truncates_and_deletes_are_charged_as_expensive():
    """Each history edit makes the engine prefill what follows it again: past the burst, dropped. An edit
    refused as invalid (an unknown item) costs nothing."""
    transport = FakeTransport(plays_out=False)
    call, _, _ = _call(transport)
    try:
        call.start()
        for i in range(8):
            call.receive(json.dumps({"type": "conversation.item.delete", "item_id": f"nope_{i}"}))
        call.receive(json.dumps({"type": "response.create"}))
        await _settle()
        item_id = next(e["item"]["id"] for e in transport.sent if e["type"] == "conversation.item.added")
        for end_ms in range(100, 0, -10):  # each one shorter: a real edit
            call.receive(
                json.dumps({"type": "conversation.item.truncate", "item_id": item_id, "audio_end_ms": end_ms})
            )
            await _settle()
        codes = [e["error"]["code"] for e in transport.sent if e["type"] == "error"]
        truncated = [e for e in transport.sent if e["type"] == "conversation.item.truncated"]
        burst = call.config.limits.expensive_event_burst
        assert len(codes) == 8 + 10 - (burst - 1) and "rate_limited" not in codes[:8]
        assert set(codes[8:]) == {"rate_limited"} and len(truncated) == burst - 1  # the reply took one
    finally:
        await call.close("test over")


async def test_a_truncate_that_does_not_shorten_is_refused():
    transport = FakeTransport(plays_out=False)
    call, _, _ = _call(transport)
    try:
        call.start()
        call.receive(json.dumps({"type": "response.create"}))
        await _settle()
        item_id = next(e["item"]["id"] for e in transport.sent if e["type"] == "conversation.item.added")
        for end_ms in (80, 90, 80, 40):
            call.receive(
                json.dumps({"type": "conversation.item.truncate", "item_id": item_id, "audio_end_ms": end_ms})
            )
            await _settle()
        answers = [e for e in transport.sent if e["type"] in ("conversation.item.truncated", "error")]
        assert [e.get("audio_end_ms", e.get("error", {}).get("code")) for e in answers] == [
            80,
            "invalid_value",
            "invalid_value",
            40,
        ]
    finally:
        await call.close("test over")


def test_max_output_tokens_inf_restores_the_default():
    def update(value: object) -> session_update.SessionUpdate:
        event = {"type": "session.update", "session": {"max_output_tokens": value}}
        parsed = P.parse_client_event(
            json.dumps(event), max_event_bytes=1 << 16, max_text_chars=100, max_instructions_chars=100
        )
        assert isinstance(parsed, session_update.SessionUpdate)
        return parsed

    assert update(100).sampling == {"max_new_tokens": 100}
    assert update("inf").sampling == {"max_new_tokens": SamplingSettings.max_new_tokens}


async def test_data_channels_with_other_labels_are_closed_logged_cut_and_capped(caplog):
    running = await start_server()
    client = RealtimeClient(running.base_url)
    caplog.set_level(logging.INFO)
    try:
        await client.connect(listen_only=True)
        for i in range(MAX_OTHER_CHANNELS + 4):
            client.pc.createDataChannel(f"{i:04d}" + "L" * 10_000)
        closing = await client.wait_for("glm4voice.call.closing", 10)
        assert closing["reason"] == "too_many_channels"
        lines = [r.getMessage() for r in caplog.records if "data channel" in r.getMessage()]
        assert 1 <= len(lines) <= 3 and all(len(line) < LOGGED_LABEL_CHARS + 120 for line in lines)
        assert not _errors(caplog)
    finally:
        await client.close()
        await running.runner.cleanup()


async def test_a_client_secret_keeps_only_the_session_fields_it_uses():
    running = await start_server(overrides={"auth": {"api_key": KEY}})
    junk = "x" * 20_000
    session = {"instructions": "be brief", "junk": junk, "audio": {"input": {"junk": junk}}}
    lists = {"session": {"instructions": "be brief", "junk": [[] for _ in range(2_000)]}}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{running.base_url}/v1/realtime/client_secrets",
                json={"session": session},
                headers={"Authorization": f"Bearer {KEY}"},
            ) as r:
                assert r.status == 200
                value = (await r.json())["value"]
            async with http.post(  # a body of thousands of empty lists is not even parsed
                f"{running.base_url}/v1/realtime/client_secrets",
                json=lists,
                headers={"Authorization": f"Bearer {KEY}"},
            ) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
        kept = running.server.auth._secrets[value].session
        assert kept == {"instructions": "be brief", "audio": {"input": {}}}
        client = RealtimeClient(running.base_url, headers={"Authorization": f"Bearer {value}"})
        await client.connect(listen_only=True)
        created = await client.wait_for("session.created", 5)
        assert created["session"]["instructions"] == "be brief"
        await client.hangup()
    finally:
        await running.runner.cleanup()


async def test_connections_over_the_cap_are_refused_without_a_traceback(caplog):
    running = await start_server(overrides={"http": {"max_connections_per_address": 4}})
    host, port = "127.0.0.1", int(running.base_url.rsplit(":", 1)[1])
    try:
        held = [await asyncio.open_connection(host, port) for _ in range(4)]
        heads = []
        for _ in range(100):
            reader, writer = await asyncio.open_connection(host, port)
            heads.append(await reader.read(12))
            writer.close()
        assert set(heads) == {b"HTTP/1.1 429"}
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.2)
        assert not _errors(caplog)
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1
    finally:
        await running.runner.cleanup()

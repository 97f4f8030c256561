"""Hostile and broken clients (docs/robustness.md): each reproduction, then the server serving a good request.

Ghost calls (a bad offer must not hold a call slot), one-way audio (a reply nobody hears still ends),
and HTTP input that used to answer 500 with a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

import aiohttp
import numpy as np
import pytest

from pipeline.responder import AudioChunk, ReplyDone, ResponderSession
from server.call import replies as reply_flow
from server.call.state import CallState
from server.metrics import Metrics
from server.realtime.conversation import Conversation
from server.webrtc.media import OutboundAudioTrack
from tests.helpers.rtc_client import RealtimeClient, make_offer, start_server


async def _post(base: str, data, headers: dict, path: str = "/v1/realtime/calls"):
    async with aiohttp.ClientSession() as http:
        async with http.post(base + path, data=data, headers=headers) as r:
            text = await r.text()
            return r.status, (json.loads(text) if r.content_type == "application/json" else text)


async def _health(base: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/health") as r:
            return await r.json()


async def _good_call(base: str, **connect) -> None:
    client = RealtimeClient(base)
    try:
        await client.connect(**connect)
        await client.wait_for("session.created", 5)
    finally:
        assert await client.hangup() == 200


# ----- item 1: ghost calls ------------------------------------------------------------------------


async def test_offers_aiortc_cannot_answer_leave_no_ghost_calls():
    running = await start_server(overrides={"limits": {"max_calls": 4}})
    try:
        good = await make_offer()
        bad = good.replace("a=mid:0", "a=mid:x")  # a=group:BUNDLE 0 1 names a mid no section has
        assert bad != good and "a=group:BUNDLE 0 1" in bad
        for _ in range(40):  # ten times the call slots
            status, body = await _post(running.base_url, bad, {"Content-Type": "application/sdp"})
            assert (status, body["error"]["code"]) == (400, "invalid_sdp"), body
        assert running.server.calls == {}
        await _good_call(running.base_url)
        assert (await _health(running.base_url))["active_calls"] == 0
    finally:
        await running.runner.cleanup()


class _FailingPeerConnection:
    """aiortc's close of a half-negotiated connection raises (its data receiver is None)."""

    async def close(self) -> None:
        raise AttributeError("'NoneType' object has no attribute '_unregister_data_receiver'")


async def test_close_completes_whatever_fails_inside_it(caplog):
    running = await start_server()
    try:
        from server.call.call import Call
        from server.webrtc.transport import WebRtcTransport

        server = running.server
        call = Call(
            "rtc_failing_close",
            WebRtcTransport(_FailingPeerConnection()),
            server.responder,
            server.vad,
            server.config,
            server.metrics,
            server.default_settings(),
            server.forget,
        )
        server.calls[call.call_id] = call
        with caplog.at_level(logging.WARNING, logger="glm4voice.webrtc"):
            await call.close("test")
        assert call.closed.is_set() and call.state is CallState.CLOSED
        assert server.calls == {}
        assert any("peer connection close failed" in r.getMessage() for r in caplog.records)
        await _good_call(running.base_url)
    finally:
        await running.runner.cleanup()


# ----- item 4: one-way audio ----------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["sendonly", "inactive"])
async def test_offers_that_cannot_hear_a_reply_are_refused(echo_server, direction):
    good = await make_offer()
    one_way = re.sub(r"^a=sendrecv", f"a={direction}", good, count=1, flags=re.MULTILINE)
    assert one_way != good
    status, body = await _post(echo_server.base_url, one_way, {"Content-Type": "application/sdp"})
    assert (status, body["error"]["code"]) == (400, "unsupported_direction"), body
    assert direction in body["error"]["message"]
    assert echo_server.server.calls == {}
    await _good_call(echo_server.base_url)


async def test_listen_only_client_hears_replies_that_end(glm_server):
    """recvonly: no microphone; a typed turn gets a spoken reply that plays out and ends."""
    client = RealtimeClient(glm_server.base_url)
    try:
        await client.connect(listen_only=True)
        await client.wait_for("session.created", 5)
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
        done = await client.wait_for("response.done", 60)
        assert done["response"]["status"] in ("completed", "incomplete")
        started = await client.wait_for("output_audio_buffer.started", 10)
        stopped = await client.wait_for("output_audio_buffer.stopped", 60)
        assert started["response_id"] == stopped["response_id"] == done["response"]["id"]
        call = glm_server.server.calls[client.call_id]
        assert call.replies.current is None and call.state is CallState.LISTENING
        assert max(float(np.abs(f).max()) for f in client.heard) > 0.01  # the reply was heard
    finally:
        assert await client.hangup() == 200


class _OneChunkTurn:
    reply_id = "turn_1"

    def __init__(self) -> None:
        self.cancelled_ms: list[float | None] = []

    async def events(self):
        yield AudioChunk(np.full(4_800, 0.1, np.float32), 48_000)  # 100 ms
        yield ReplyDone("stop", "hi")

    def cancel(self, played_ms: float | None = None) -> None:
        self.cancelled_ms.append(played_ms)


class _OneTurnSession(ResponderSession):
    def __init__(self) -> None:
        self.turn = _OneChunkTurn()

    def update(self, settings) -> None: ...
    def push_audio(self, pcm16k) -> None: ...
    def commit_audio(self) -> None: ...
    def discard_audio(self) -> None: ...
    def add_text(self, text: str) -> None: ...

    def respond(self):
        return self.turn

    async def close(self) -> None: ...


async def test_reply_whose_audio_is_never_read_ends(monkeypatch):
    """Nobody pulls the outbound track (a peer that stopped reading): the reply ends on its own."""
    monkeypatch.setattr(reply_flow, "PLAYOUT_SLACK_S", 0.3)
    sent: list[dict] = []
    phases: list[CallState] = []
    tasks: list[asyncio.Task] = []
    flow = reply_flow.ReplyFlow(
        _OneTurnSession(),
        Metrics(),
        sent.append,
        lambda coro, name: tasks.append(asyncio.ensure_future(coro)) or tasks[-1],
        phases.append,
        logging.LoggerAdapter(logging.getLogger("test"), {}),
        Conversation(),
        OutboundAudioTrack(),
        plays_out=True,
    )
    flow.start(speech_stopped_s=None)
    await asyncio.gather(*tasks)
    assert [
        e["type"] for e in sent if e["type"] == "response.done"
    ] and flow.current is not None  # audio still queued
    await asyncio.wait_for(flow.idle.wait(), 0.1 + 0.3 + 2.0)
    timed_out = [e for e in sent if e["type"] == "glm4voice.output_audio_buffer.timed_out"]
    assert len(timed_out) == 1 and timed_out[0]["unplayed_ms"] == 100 and timed_out[0]["played_ms"] == 0
    assert phases[-1] is CallState.LISTENING and flow.current is None


# ----- item 9: HTTP input that answered 500 ------------------------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _multipart(part_headers: str, body: str, boundary: str = "b0undary") -> tuple[bytes, dict]:
    sdp_part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="sdp"\r\n{part_headers}\r\n{body}\r\n'
        f"--{boundary}--\r\n"
    )
    return sdp_part.encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


CASES_500 = {
    "nested-json-offer": lambda sdp: (
        json.dumps({"sdp": sdp, "type": "offer", "session": "@"}).replace(
            '"@"', '{"x": ' + _nested(25_000) + "}"
        ),
        {"Content-Type": "application/json"},
        "/v1/realtime/calls",
        (400, "invalid_json"),
    ),
    "nested-json-mint": lambda sdp: (
        '{"session": ' + _nested(25_000) + "}",
        {"Content-Type": "application/json"},
        "/v1/realtime/client_secrets",
        (400, "invalid_json"),
    ),
    "audio-input-not-object": lambda sdp: (
        json.dumps({"sdp": sdp, "session": {"audio": {"input": 5}}}),
        {"Content-Type": "application/json"},
        "/v1/realtime/calls",
        (400, "invalid_value"),
    ),
    "audio-input-list": lambda sdp: (
        json.dumps({"sdp": sdp, "session": {"audio": {"input": ["turn_detection"]}}}),
        {"Content-Type": "application/json"},
        "/v1/realtime/calls",
        (400, "invalid_value"),
    ),
    "huge-integer": lambda sdp: (
        json.dumps({"sdp": sdp, "session": {"temperature": "@"}}).replace('"@"', "1" + "0" * 400),
        {"Content-Type": "application/json"},
        "/v1/realtime/calls",
        (400, "invalid_value"),
    ),
    "huge-integer-mint": lambda sdp: (
        '{"session": {"audio": {"input": {"turn_detection": {"threshold": 1' + "0" * 400 + "}}}}}",
        {"Content-Type": "application/json"},
        "/v1/realtime/client_secrets",
        (400, "invalid_value"),
    ),
    "bogus-charset-part": lambda sdp: (
        *_multipart("Content-Type: text/plain; charset=bogus\r\n", sdp),
        "/v1/realtime/calls",
        (400, "invalid_body"),
    ),
    "bogus-charset-urlencoded": lambda sdp: (
        "sdp=v%3D0",
        {"Content-Type": "application/x-www-form-urlencoded; charset=bogus"},
        "/v1/realtime/calls",
        (400, "invalid_body"),
    ),
    "unknown-transfer-encoding": lambda sdp: (
        *_multipart("Content-Transfer-Encoding: rot13\r\n", sdp),
        "/v1/realtime/calls",
        (400, "invalid_body"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES_500))
async def test_bad_http_input_gets_4xx_not_500(echo_server, case, caplog):
    base = echo_server.base_url
    good = await make_offer()
    body, headers, path, expected = CASES_500[case](good)
    with caplog.at_level(logging.ERROR):
        status, got = await _post(base, body, headers, path)
    assert (status, got["error"]["code"]) == expected, got
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an error was logged"
    assert echo_server.server.calls == {}
    await _good_call(base)


@pytest.mark.parametrize("path", ["/v1/realtime/calls", "/session"])
async def test_non_utf8_authorization_is_401_not_500(path, caplog):
    running = await start_server(overrides={"auth": {"api_key": "sk-test-key-0123456789"}})
    raw = b"Bearer sk-\xff\xfe-key"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(running.base_url.rsplit(":", 1)[1]))
        offer = (await make_offer()).encode()
        method = b"POST" if path != "/session" else b"GET"
        body = offer if method == b"POST" else b""
        writer.write(
            method
            + b" "
            + path.encode()
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: "
            + raw
            + b"\r\nContent-Type: application/sdp\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        with caplog.at_level(logging.ERROR):
            response = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status = int(response.split(b" ", 2)[1])
        assert status == (401 if path != "/session" else 200), response[:300]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        client = RealtimeClient(running.base_url, headers={"Authorization": "Bearer sk-test-key-0123456789"})
        try:
            await client.connect()
            await client.wait_for("session.created", 5)
        finally:
            assert await client.hangup() == 200
    finally:
        await running.runner.cleanup()


async def test_client_disconnecting_mid_body_is_not_a_traceback(echo_server, caplog):
    port = int(echo_server.base_url.rsplit(":", 1)[1])
    with caplog.at_level(logging.ERROR):
        for content_type in (b"application/sdp", b"multipart/form-data; boundary=xx"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/realtime/calls HTTP/1.1\r\nHost: x\r\nContent-Type: "
                + content_type
                + b"\r\nContent-Length: 5000\r\n\r\n"
                + b"v=0\r\n" * 50
            )
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        await _good_call(echo_server.base_url)  # long after the server saw the resets
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]


# ----- item 5: half-open connections, connection caps --------------------------------------------


async def test_half_open_connections_from_one_client_do_not_stop_health_for_another():
    running = await start_server(
        overrides={
            "http": {
                "header_timeout_s": 1.0,
                "body_timeout_s": 1.0,
                "max_connections_per_address": 8,
                "max_connections": 64,
            }
        }
    )
    port = int(running.base_url.rsplit(":", 1)[1])
    attackers = []
    try:
        for _ in range(30):  # from another loopback address: one client, many half-open requests
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a request head that never ends
            attackers.append((reader, writer))
        health = await _health(running.base_url)  # another client (127.0.0.1) is served
        assert health["ready"] is True
        over_cap = [await asyncio.wait_for(reader.read(), 5) for reader, _ in attackers[8:]]
        assert all(r.startswith(b"HTTP/1.1 429") and b"too_many_connections" in r for r in over_cap), (
            over_cap[0]
        )
        # the ones under the cap are dropped at the header deadline, without an answer
        within = [await asyncio.wait_for(reader.read(), 5) for reader, _ in attackers[:8]]
        assert within == [b""] * 8
        # a body that never arrives: 408 at the body deadline
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        writer.write(
            b"POST /v1/realtime/calls HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n"
            b"Content-Length: 1000\r\n\r\nv=0\r\n"
        )
        attackers.append((reader, writer))
        answer = await asyncio.wait_for(reader.readuntil(b"}}"), 5)  # the JSON error's end
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer[:200]
        await _good_call(running.base_url)
    finally:
        for _, writer in attackers:
            writer.close()
        await running.runner.cleanup()


def test_fd_limit_check_covers_the_caps():
    import resource

    from server.config import load_config
    from server.edge.connections import check_fd_limit, fds_needed

    config = load_config(
        None, env={}, overrides={"http": {"max_connections": 100}, "limits": {"max_calls": 4}}
    )
    soft, needed = check_fd_limit(config)
    assert needed == fds_needed(config) > 100
    now_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == now_soft and (soft >= needed or soft == hard)  # raised as far as the hard limit allows

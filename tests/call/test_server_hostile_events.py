"""Hostile clients (docs/robustness.md, the per-event attacks): each reproduction, then a good call served.

Malformed events that used to end their call, expensive events and inbound audio over real time that
stalled other calls, a forged X-Forwarded-For, an offer that makes us send STUN to a thousand ports,
log floods and tracebacks, a late client secret, call ids (hangup capabilities) in the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import re
import time

import aiohttp
import av
import numpy as np
from aiohttp.test_utils import make_mocked_request
from aiortc.rtcsctptransport import WEBRTC_STRING

from server.call.guard import INBOUND_BURST_S, CallGuard
from server.config import LimitsConfig
from server.edge.limits import client_address
from server.logs import CallIdFilter, call_tag
from server.realtime import protocol as P
from server.webrtc.rtc import MAX_CANDIDATES_PER_ADDRESS, filter_remote_candidates
from tests.helpers.rtc_client import FRAME, RATE_48K, MicTrack, RealtimeClient, make_offer, start_server

API_KEY = "sk-test-key-0123456789"
HUGE = "1" + "0" * 400  # an integer with no float: OverflowError where it was converted


def _item(content: list) -> str:
    return json.dumps(
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": content}}
    )


def _session(session: dict) -> str:
    return json.dumps({"type": "session.update", "session": session})


# Each of these ended its call (the exception escaped through pyee into aiortc's receive loop).
MALFORMED = {
    "audio.input=5": _session({"audio": {"input": 5}}),
    "audio.input=list": _session({"audio": {"input": ["turn_detection"]}}),
    "audio.input=str": _session({"audio": {"input": "turn_detection"}}),
    "content.type=list": _item([{"type": [], "text": "hi"}]),
    "content.type=object": _item([{"type": {}, "text": "hi"}]),
    "temperature=huge": _session({"temperature": "@"}).replace('"@"', HUGE),
    "threshold=huge": _session({"audio": {"input": {"turn_detection": {"threshold": "@"}}}}).replace(
        '"@"', HUGE
    ),
    "instructions=surrogate": _session({"instructions": "be \ud800 brief"}),  # json.dumps writes \ud800
    "text=surrogate": _item([{"type": "input_text", "text": "hello \udc00"}]),
    "event_id=surrogate": json.dumps({"type": "glm4voice.ping", "event_id": "e\ud800"}),
    "create_response=str": _session({"audio": {"input": {"turn_detection": {"create_response": "yes"}}}}),
    "transcription=5": _session({"audio": {"input": {"transcription": 5}}}),
    "transcription.language=list": _session({"input_audio_transcription": {"language": ["en"]}}),
    "transcription.language=unknown": _session({"audio": {"input": {"transcription": {"language": "xx"}}}}),
    "transcription.prompt=surrogate": _session({"input_audio_transcription": {"prompt": "a \ud800 b"}}),
}


def _send_not_utf8(client: RealtimeClient, data: bytes) -> None:
    """A data-channel *text* message whose bytes are not UTF-8 (aiortc's send would encode a str)."""
    channel = client.channel
    transport = channel.transport
    channel._addBufferedAmount(len(data))
    transport._data_channel_queue.append((channel, WEBRTC_STRING, data))
    asyncio.ensure_future(transport._data_channel_flush())


async def _ping(client: RealtimeClient) -> None:
    mark = len(client.events)
    client.send({"type": "glm4voice.ping", "event_id": "alive"})
    pong = await client.wait_for("glm4voice.pong", 5, after=mark)
    assert pong["ping_event_id"] == "alive"


async def _good_call(base: str, **connect) -> None:
    client = RealtimeClient(base)
    try:
        await client.connect(**connect)
        await client.wait_for("session.created", 5)
        await _ping(client)
    finally:
        assert await client.hangup() == 200


# ----- item 3: one malformed event must not kill its call ----------------------------------------


async def test_each_malformed_event_gets_an_error_and_the_call_goes_on(echo_server, caplog):
    client = RealtimeClient(echo_server.base_url)
    try:
        await client.connect()
        await client.wait_for("session.created", 5)
        cases = [*MALFORMED.items(), ("text frame not UTF-8", b'{"type": "glm4voice.ping", "x": "\xff\xfe"}')]
        with caplog.at_level(logging.ERROR):
            for name, message in cases:
                mark = len(client.events)
                if isinstance(message, bytes):
                    _send_not_utf8(client, message)
                else:
                    client.send(message)
                error = await client.wait_for("error", 5, after=mark)
                # validated: a client error naming what is wrong, not the catch-all
                assert error["error"]["type"] == "invalid_request_error", (name, error)
                await _ping(client)  # the call is alive after each
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert client.call_id in echo_server.server.calls
    finally:
        assert await client.hangup() == 200
    await _good_call(echo_server.base_url)


async def test_an_event_that_fails_inside_the_handler_is_one_error_and_one_log_line(
    echo_server, monkeypatch, caplog
):
    from server.call.client_events import ClientEvents

    handle = ClientEvents.handle

    def failing(self, event):
        if isinstance(event, P.ResponseCancel):
            raise RuntimeError("a bug in a handler")
        handle(self, event)

    monkeypatch.setattr(ClientEvents, "handle", failing)
    client = RealtimeClient(echo_server.base_url)
    try:
        await client.connect()
        await client.wait_for("session.created", 5)
        with caplog.at_level(logging.ERROR, logger="glm4voice.call"):
            mark = len(client.events)
            for _ in range(5):
                client.send({"type": "response.cancel"})
            await _ping(client)
        errors = [e for e in client.events[mark:] if e["type"] == "error"]
        assert [e["error"]["code"] for e in errors] == ["server_error"] * 5
        logged = [r for r in caplog.records if "client event failed" in r.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is not None  # a flood is one line, with its traceback
        assert echo_server.server.metrics.value("glm4voice_events_failed_total") == 5
    finally:
        assert await client.hangup() == 200


async def test_session_settings_that_cannot_be_sent_back_are_refused_at_mint_and_offer():
    running = await start_server(overrides={"auth": {"api_key": API_KEY}})
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    try:
        async with aiohttp.ClientSession() as http:
            for session in ({"instructions": "be \ud800 brief"}, {"temperature": 2.5}):
                async with http.post(
                    running.base_url + "/v1/realtime/client_secrets",
                    headers={**bearer, "Content-Type": "application/json"},
                    data=json.dumps({"session": session}),
                ) as r:
                    assert r.status == 400, await r.text()
                    assert (await r.json())["error"]["code"] == "invalid_value"
            offer = await make_offer()
            async with http.post(
                running.base_url + "/v1/realtime/calls",
                headers=bearer,
                json={"sdp": offer, "type": "offer", "session": {"instructions": "x\udfff"}},
            ) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_value"
            assert running.server.calls == {}
        client = RealtimeClient(running.base_url, headers=bearer)
        try:
            await client.connect()
            await _ping(client)
        finally:
            assert await client.hangup() == 200
    finally:
        await running.runner.cleanup()


# ----- item 2b: events that make the engine work are charged ---------------------------------------


async def test_instructions_changes_and_response_create_have_their_own_rate(echo_server):
    limits = echo_server.server.config.limits
    client = RealtimeClient(echo_server.base_url)
    try:
        await client.connect()
        await client.wait_for("session.created", 5)
        mark = len(client.events)
        n = limits.expensive_event_burst + 5
        for i in range(n):  # distinct 4000-character instructions, as fast as the channel goes
            client.send(_session({"instructions": f"{i:04d}" + "x" * (limits.max_instructions_chars - 4)}))
        await _ping(client)
        updated = client.of_type("session.updated")
        refused = [
            e for e in client.events[mark:] if e["type"] == "error" and e["error"]["code"] == "rate_limited"
        ]
        assert limits.expensive_event_burst <= len(updated) <= limits.expensive_event_burst + 1
        assert len(updated) + len(refused) == n
        # the same instructions again, or other fields, cost nothing
        mark = len(client.events)
        client.send(_session({"instructions": updated[-1]["session"]["instructions"], "temperature": 0.7}))
        assert (await client.wait_for("session.updated", 5, after=mark))["session"]["temperature"] == 0.7
        # response.create draws from the same bucket
        mark = len(client.events)
        client.send({"type": "response.create"})
        error = await client.wait_for("error", 5, after=mark)
        assert error["error"]["code"] == "rate_limited"
        await asyncio.sleep(1.1 / limits.max_expensive_events_per_s)  # one token back
        mark = len(client.events)
        client.send(_session({"instructions": "short again"}))
        assert (await client.wait_for("session.updated", 5, after=mark))["session"][
            "instructions"
        ] == "short again"
    finally:
        assert await client.hangup() == 200
    await _good_call(echo_server.base_url)


async def test_too_much_pending_input_is_a_clear_error(demo_dir):
    """The engine's bound on input waiting for a reply reaches the client as an `error` event."""
    from pipeline.engine.config import EngineConfig
    from pipeline.engine.thread import GLMVoiceResponder

    responder = GLMVoiceResponder(
        EngineConfig(demo_weights_dir=str(demo_dir), device="cpu", max_pending_items=2)
    )
    running = await start_server(responder=responder, kind="glm4voice")
    client = RealtimeClient(running.base_url)
    try:
        await client.connect(listen_only=True)
        await client.wait_for("session.created", 5)
        for i in range(3):
            client.send(_item([{"type": "input_text", "text": f"message {i}"}]))
        mark = len(client.events)
        client.send({"type": "response.create"})
        error = await client.wait_for("error", 30, after=mark)
        assert error["error"]["code"] == "input_too_large" and "dropped" in error["error"]["message"]
        failed = await client.wait_for("response.done", 30, after=mark)
        assert failed["response"]["status"] == "failed"
        mark = len(client.events)
        client.send(_item([{"type": "input_text", "text": "hello"}]))
        await asyncio.sleep(1.0)  # the expensive-event bucket
        client.send({"type": "response.create"})
        done = await client.wait_for("response.done", 60, after=mark)
        assert done["response"]["status"] in ("completed", "incomplete")
    finally:
        assert await client.hangup() == 200
        await running.runner.cleanup()


# ----- item 6: inbound media policed against real time ---------------------------------------------


def test_inbound_policing_keeps_real_time_and_drops_a_flood():
    limits = LimitsConfig(inbound_flood_s=3.0, peer_timeout_s=0, idle_timeout_s=0)
    guard = CallGuard(limits, now_s=0.0)
    rng = np.random.default_rng(1)
    t = 0.0
    for i in range(3000):  # 60 s of 20 ms frames with arrival jitter and a 0.8 s stall caught up at once
        arrival = i * 0.02 + rng.uniform(0, 0.03) + (0.8 if 1000 <= i < 1040 else 0.0)
        t = max(t, arrival)
        assert guard.inbound_frame(t, 0.02), i
        assert guard.check(t, replying=False) is None
    # 20x real time: after the burst, about real time is kept and the rest dropped
    start = t
    kept = sum(
        guard.inbound_frame(start + k * 0.001, 0.02) for k in range(2000)
    )  # 2 s of wall clock, 40 s audio
    assert INBOUND_BURST_S / 0.02 <= kept <= (INBOUND_BURST_S + 2 * 1.05) / 0.02 + 1
    assert guard.inbound_frames_dropped == 2000 - kept
    assert guard.check(start + 2.0, replying=False) is None  # not yet inbound_flood_s of drops
    for k in range(2000, 4000):
        guard.inbound_frame(start + k * 0.001, 0.02)
    ending = guard.check(start + 4.0, replying=False)
    assert ending is not None and ending.code == "inbound_flood" and ending.notify


class FloodMic(MicTrack):
    """A sender `speedup` times faster than real time (what the reported flood attack did)."""

    def __init__(self, speedup: float) -> None:
        super().__init__()
        self.speedup = speedup

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        self._index += 1
        due = self._start + self._index * FRAME / RATE_48K / self.speedup
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        frame = av.AudioFrame.from_ndarray(np.zeros((1, FRAME), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = RATE_48K, self._index * FRAME
        return frame


async def test_a_sender_over_real_time_is_dropped_then_ended(monkeypatch):
    """The excess is dropped per packet before it is decoded (server/webrtc/packets.py): the server's
    Opus decoder sees about real time, not the tenfold flood."""
    from aiortc.codecs.opus import OpusDecoder

    decoded = []  # every Opus decode in this process: the server's, and the client's of the replies' audio
    decode = OpusDecoder.decode
    monkeypatch.setattr(OpusDecoder, "decode", lambda self, frame: decoded.append(1) or decode(self, frame))
    running = await start_server(overrides={"limits": {"inbound_flood_s": 2.0}})
    mic = FloodMic(speedup=10)
    client = RealtimeClient(running.base_url, mic=mic)
    t0 = time.monotonic()
    try:
        await client.connect()
        error = await client.wait_for("error", 10)
        assert error["error"]["code"] == "input_audio_too_fast"
        closing = await client.wait_for("glm4voice.call.closing", 10)
        assert closing["reason"] == "inbound_flood"
        # Each side decodes at most real time (20 ms packets), plus the 1 s the server allows ahead and
        # some slack; the flood sent ten times that.
        real_time = 2 * (time.monotonic() - t0) / 0.02 + 100
        assert len(decoded) <= real_time < mic._index, (len(decoded), real_time, mic._index)
        metrics = running.server.metrics
        assert metrics.value("glm4voice_inbound_frames_dropped_total") > 0
        assert metrics.value("glm4voice_calls_ended_total", reason="inbound_flood") == 1
        assert len([e for e in client.events if e["type"] == "error"]) <= 2  # rate-limited, not one per frame
    finally:
        await client.close()
    try:
        await _good_call(running.base_url)
    finally:
        await running.runner.cleanup()


# ----- item 7: X-Forwarded-For --------------------------------------------------------------------


def test_forwarded_for_takes_the_entry_our_proxy_appended():
    def address(xff: list[str], trust: bool = True, hops: int = 1) -> str:
        headers = [("X-Forwarded-For", value) for value in xff]
        request = make_mocked_request("POST", "/", headers=headers)
        return client_address(request, trust, hops)

    assert address(["6.6.6.6, 203.0.113.9"]) == "203.0.113.9"  # the client wrote 6.6.6.6
    assert address(["6.6.6.6", "203.0.113.9"]) == "203.0.113.9"  # proxies may add a header line each
    assert address(["6.6.6.6, 203.0.113.9, 10.0.0.2"], hops=2) == "203.0.113.9"
    assert address(["203.0.113.9"], hops=3) == "203.0.113.9"  # a shorter chain: its leftmost
    assert address(["6.6.6.6, 203.0.113.9"], trust=False) != "203.0.113.9"


async def test_rotating_the_client_part_of_forwarded_for_does_not_evade_the_rate_limit():
    running = await start_server(
        overrides={
            "http": {"trust_forwarded_for": True},
            "limits": {"calls_per_minute_per_address": 1, "call_burst_per_address": 2},
        }
    )
    try:
        async with aiohttp.ClientSession() as http:
            statuses = []
            for i in range(4):
                async with http.post(
                    running.base_url + "/v1/realtime/client_secrets",
                    json={},
                    headers={"X-Forwarded-For": f"10.9.9.{i}, 198.51.100.7"},
                ) as r:
                    statuses.append(r.status)
            assert statuses == [200, 200, 429, 429]
            # a victim's address written on the left locks nobody out
            async with http.post(
                running.base_url + "/v1/realtime/client_secrets",
                json={},
                headers={"X-Forwarded-For": "198.51.100.7, 198.51.100.8"},
            ) as r:
                assert r.status == 200
    finally:
        await running.runner.cleanup()


# ----- item 8: remote ICE candidates --------------------------------------------------------------


def _with_candidates(sdp: str, candidates: list[str]) -> str:
    lines = sdp.split("\r\n")
    at = next(i for i, line in enumerate(lines) if line.startswith("a=mid:"))
    return "\r\n".join(lines[: at + 1] + candidates + lines[at + 1 :])


def test_remote_candidates_are_capped_per_offer_and_per_address():
    sdp = _with_candidates(
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n",
        [f"a=candidate:{i} 1 udp 2113937151 192.0.2.{i % 3} {10_000 + i} typ host" for i in range(1000)],
    )
    kept, dropped = filter_remote_candidates(sdp, (), 16, MAX_CANDIDATES_PER_ADDRESS)
    candidates = [line for line in kept.splitlines() if line.startswith("a=candidate:")]
    assert len(candidates) == 3 * MAX_CANDIDATES_PER_ADDRESS and dropped == 1000 - len(candidates)
    kept, _ = filter_remote_candidates(sdp, (), 5, 0)
    assert len([line for line in kept.splitlines() if line.startswith("a=candidate:")]) == 5


async def test_an_offer_with_a_thousand_candidates_points_us_at_a_few(echo_server):
    offer = await make_offer()
    flood = [
        f"a=candidate:f{i} 1 udp 2113937151 127.0.0.{2 + i % 200} {20_000 + i} typ host" for i in range(1000)
    ]
    bad = _with_candidates(offer, flood)
    assert len(bad) > 60_000
    async with aiohttp.ClientSession() as http:
        async with http.post(
            echo_server.base_url + "/v1/realtime/calls", data=bad, headers={"Content-Type": "application/sdp"}
        ) as r:
            assert r.status == 201, await r.text()
            call_id = r.headers["Location"].rsplit("/", 1)[-1]
        call = echo_server.server.calls[call_id]
        remote = _remote_candidates(call.transport.pc)
        cap = echo_server.server.config.webrtc.max_remote_candidates
        assert 0 < len(remote) <= cap
        async with http.post(f"{echo_server.base_url}/v1/realtime/calls/{call_id}/hangup") as r:
            assert r.status == 200
    await _good_call(echo_server.base_url)


def _remote_candidates(pc) -> list:
    """Every remote candidate the peer connection's ICE agents hold (aioice internals)."""
    seen = {}
    for transceiver in pc.getTransceivers():
        ice = transceiver.receiver.transport.transport
        seen[id(ice)] = ice
    if pc.sctp is not None:
        ice = pc.sctp.transport.transport
        seen[id(ice)] = ice
    return [c for ice in seen.values() for c in ice._connection.remote_candidates]


# ----- item 10: log floods and tracebacks ---------------------------------------------------------


async def test_offer_without_fingerprint_is_400_not_201_and_a_task_traceback(echo_server, caplog):
    offer = await make_offer()
    with caplog.at_level(logging.ERROR):
        for attribute in ("fingerprint", "ice-ufrag", "ice-pwd"):
            bad = re.sub(rf"^a={attribute}:.*\r\n", "", offer, flags=re.MULTILINE)
            assert bad != offer
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    echo_server.base_url + "/v1/realtime/calls",
                    data=bad,
                    headers={"Content-Type": "application/sdp"},
                ) as r:
                    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_sdp"
                    assert attribute in (await r.json())["error"]["message"]
        assert echo_server.server.calls == {}
        await _good_call(echo_server.base_url)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_malformed_http_is_one_warning_line_not_a_traceback(echo_server, caplog):
    port = int(echo_server.base_url.rsplit(":", 1)[1])
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n")
            response = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert response.split(b" ", 2)[1] == b"400", response[:100]
    logged = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(logged) == 1, [r.getMessage() for r in logged]  # five bad requests, one line
    assert logged[0].levelno == logging.WARNING and logged[0].exc_info is None
    await _good_call(echo_server.base_url)


# ----- item 11: a late client secret; call ids out of the log -------------------------------------


async def test_a_secret_used_after_expiry_is_expired_not_invalid():
    running = await start_server(overrides={"auth": {"api_key": API_KEY}})
    try:
        auth = running.server.auth
        async with aiohttp.ClientSession() as http:
            async with http.post(
                running.base_url + "/v1/realtime/client_secrets",
                json={},
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as r:
                value = (await r.json())["value"]
            auth._secrets[value] = dataclasses.replace(auth._secrets[value], expires_at=time.time() - 1.0)
            auth.prune()  # what the server's housekeeping does once a second
            async with http.post(
                running.base_url + "/v1/realtime/calls",
                data=await make_offer(),
                headers={"Authorization": f"Bearer {value}", "Content-Type": "application/sdp"},
            ) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "expired_client_secret"
            async with http.post(
                running.base_url + "/v1/realtime/calls",
                data=await make_offer(),
                headers={"Authorization": "Bearer ek_never_minted", "Content-Type": "application/sdp"},
            ) as r:
                assert (await r.json())["error"]["code"] == "invalid_client_secret"
        client = RealtimeClient(running.base_url, headers={"Authorization": f"Bearer {API_KEY}"})
        try:
            await client.connect()
            await _ping(client)
        finally:
            assert await client.hangup() == 200
    finally:
        await running.runner.cleanup()


async def test_log_lines_carry_a_tag_of_the_call_id_never_the_id(echo_server):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(CallIdFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s call=%(call_id)s %(message)s"))
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        client = RealtimeClient(echo_server.base_url)
        await client.connect()
        await _ping(client)
        client.send({"type": "response.cancel"})  # an error path too
        await _ping(client)
        assert await client.hangup() == 200
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
    text = stream.getvalue()
    assert client.call_id not in text
    assert f"call={call_tag(client.call_id)} " in text
    assert re.fullmatch(r"[0-9a-f]{12}", call_tag(client.call_id))

"""Resume after a network drop (server/call/resume.py), on the echo responder: a dropped call's
conversation is
parked under its resume token and a new offer presenting the token continues it; a hangup does not park;
unknown, used and expired tokens start fresh with `glm4voice.session.resume_failed`; parked calls yield
their slots to new calls and are capped per address; a refused resume changes nothing; a WebSocket call
follows the same rules (a socket lost without a normal closure parks it). The engine side (no re-prefill
after a resume) is in tests/call/test_glm_call.py."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import aiohttp

from server.call.resume import RESUME_HEADER
from tests.helpers.rtc_client import RealtimeClient, make_offer, start_server


async def typed_turn(client: RealtimeClient, text: str) -> dict:
    mark = len(client.events)
    client.send(
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
        }
    )
    client.send({"type": "response.create"})
    return await client.wait_for("response.done", 10, after=mark)


async def dial(base_url: str, token: str | None = None) -> RealtimeClient:
    client = RealtimeClient(base_url, headers={RESUME_HEADER: token} if token else {})
    await client.connect()
    await client.wait_for("session.created", 5)
    return client


async def drop(running, client: RealtimeClient):
    """The client's network path goes: its peer connection is closed without a hangup. -> the server's
    Call."""
    call = running.server.calls[client.call_id]
    await client.close()
    await call.closed.wait()
    return call


async def test_dropped_call_resumes_with_its_conversation(echo_server):
    first = await dial(echo_server.base_url)
    created = first.of_type("session.created")[0]
    token = created["resume_token"]
    assert token and created["resume_window_s"] == 60
    await typed_turn(first, "Remember the word apricot.")
    old = await drop(echo_server, first)
    assert old.close_reason.startswith("peer connection closed")
    assert len(echo_server.server.parked) == 1 and not old.session.closed  # kept, not freed
    health = await _health(echo_server.base_url)
    assert health["parked_calls"] == 1 and health["active_calls"] == 0

    second = await dial(echo_server.base_url, token)
    try:
        resumed = await second.wait_for("glm4voice.session.resumed", 5)
        assert resumed["items"] == 2  # the typed user item and the reply
        new_token = second.of_type("session.created")[0]["resume_token"]
        assert new_token != token  # single use: the resumed call gets its own
        call = echo_server.server.calls[second.call_id]
        assert call.session is old.session and len(echo_server.server.parked) == 0
        assert [e.role for e in call.session.history] == ["user", "assistant"]
        done = await typed_turn(second, "Which word was it?")
        assert done["response"]["status"] == "completed"
        assert [e.role for e in call.session.history] == ["user", "assistant"] * 2
    finally:
        await second.hangup()
    assert len(echo_server.server.parked) == 0 and call.session.closed  # a hangup frees it at once


async def test_hangup_does_not_park_and_bad_tokens_start_fresh(echo_server):
    first = await dial(echo_server.base_url)
    token = first.of_type("session.created")[0]["resume_token"]
    call = echo_server.server.calls[first.call_id]
    await first.hangup()
    assert call.session.closed and len(echo_server.server.parked) == 0
    for presented, reason in ((token, "unknown"), ("rsm_" + "x" * 32, "unknown")):
        client = await dial(echo_server.base_url, presented)
        try:
            failed = await client.wait_for("glm4voice.session.resume_failed", 5)
            assert failed["reason"] == reason and failed["message"]
            assert not client.of_type("glm4voice.session.resumed")
            assert echo_server.server.calls[client.call_id].session.history == []
        finally:
            await client.hangup()
    # a token is good for one resume
    dropped = await dial(echo_server.base_url)
    token = dropped.of_type("session.created")[0]["resume_token"]
    await drop(echo_server, dropped)
    resumed = await dial(echo_server.base_url, token)
    await resumed.wait_for("glm4voice.session.resumed", 5)
    again = await dial(echo_server.base_url, token)
    try:
        assert (await again.wait_for("glm4voice.session.resume_failed", 5))["reason"] == "already_resumed"
    finally:
        await resumed.hangup()
        await again.hangup()


async def test_reconnect_before_the_drop_is_noticed_takes_the_call_over(echo_server):
    """A client that sees the loss first (no audio for 3 s) offers again while the server still holds the
    old call: that call parks at once and the new one continues it."""
    first = await dial(echo_server.base_url)
    token = first.of_type("session.created")[0]["resume_token"]
    await typed_turn(first, "One.")
    old = echo_server.server.calls[first.call_id]
    second = await dial(echo_server.base_url, token)
    try:
        await second.wait_for("glm4voice.session.resumed", 5)
        assert old.closed.is_set() and first.call_id not in echo_server.server.calls
        assert echo_server.server.calls[second.call_id].session is old.session
    finally:
        await second.hangup()
        await first.close()


async def test_parked_call_expires():
    running = await start_server(overrides={"limits": {"max_calls": 1, "resume_window_s": 1.0}})
    try:
        first = await dial(running.base_url)
        token = first.of_type("session.created")[0]["resume_token"]
        old = await drop(running, first)
        resumed = await dial(running.base_url, token)  # the parked conversation takes the one slot back
        await resumed.wait_for("glm4voice.session.resumed", 5)
        token = resumed.of_type("session.created")[0]["resume_token"]
        await drop(running, resumed)
        assert len(running.server.parked) == 1
        closed = asyncio.Event()  # the window is a loop timer that closes the session
        real_close = old.session.close

        async def close() -> None:
            await real_close()
            closed.set()

        old.session.close = close
        await asyncio.wait_for(closed.wait(), 5.0)
        assert len(running.server.parked) == 0 and old.session.closed
        late = RealtimeClient(running.base_url, headers={RESUME_HEADER: token})
        await late.connect()
        try:
            assert (await late.wait_for("glm4voice.session.resume_failed", 5))["reason"] == "expired"
        finally:
            await late.hangup()
    finally:
        await running.runner.cleanup()


async def test_parked_calls_yield_to_live_ones_and_are_capped_per_address():
    """Callers that vanished never lock out new ones: a parked call gives its slot to a new call, and one
    address keeps at most `max_parked_per_address` parked calls (the oldest goes)."""
    limits = {"max_calls": 2, "max_parked_per_address": 1, "resume_window_s": 60.0}
    running = await start_server(overrides={"limits": limits})
    try:
        tokens = []
        for _ in range(2):  # one address fills both slots, then vanishes
            client = await dial(running.base_url)
            tokens.append(client.of_type("session.created")[0]["resume_token"])
            await drop(running, client)
        assert len(running.server.parked) == 1  # the second drop closed the first parked call
        assert running.server.parked.holds(tokens[1]) and not running.server.parked.holds(tokens[0])
        others = []
        for address in ("127.0.0.2", "127.0.0.3"):  # both slots for new callers: the parked call yields
            others.append(RealtimeClient(running.base_url, local_address=address))
            await others[-1].connect()
        assert len(running.server.parked) == 0 and len(running.server.calls) == 2
        await others[0].hangup()
        for token in tokens:
            late = await dial(running.base_url, token)
            assert (await late.wait_for("glm4voice.session.resume_failed", 5))["reason"] == "evicted"
            await late.hangup()
        await others[1].hangup()
    finally:
        await running.runner.cleanup()


async def test_a_refused_resume_changes_nothing(echo_server):
    """An offer refused by our SDP checks carrying a live call's token leaves that call live; an offer that
    only aiortc refuses carrying a parked call's token leaves the conversation parked for a good resume."""
    live = await dial(echo_server.base_url)
    token = live.of_type("session.created")[0]["resume_token"]
    offer = await make_offer()
    no_fingerprint = re.sub(r"^a=fingerprint:.*\r\n", "", offer, flags=re.MULTILINE)
    aiortc_refuses = offer.replace("a=setup:actpass", "a=setup:bogus")
    assert aiortc_refuses != offer
    async with aiohttp.ClientSession() as http:
        for sdp in (no_fingerprint, aiortc_refuses):
            body = {"sdp": sdp, "type": "offer", "resume_token": token}
            async with http.post(f"{echo_server.base_url}/v1/realtime/calls", json=body) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_sdp"
        assert live.call_id in echo_server.server.calls
        assert not echo_server.server.calls[live.call_id].closed.is_set()
        await typed_turn(live, "Still here.")
        await drop(echo_server, live)
        body = {"sdp": aiortc_refuses, "type": "offer", "resume_token": token}
        async with http.post(f"{echo_server.base_url}/v1/realtime/calls", json=body) as r:
            assert r.status == 400
        assert echo_server.server.parked.holds(token)
    resumed = await dial(echo_server.base_url, token)
    try:
        await resumed.wait_for("glm4voice.session.resumed", 5)
    finally:
        await resumed.hangup()


async def _health(base_url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/health") as r:
        return await r.json()


# ----- the WebSocket transport: the same token rules ------------------------------------------------


class SocketClient:
    """A bare Realtime WebSocket client (aiohttp): events in order, typed turns."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict] = []

    async def wait_for(self, kind: str, timeout_s: float = 10.0) -> dict:
        async with asyncio.timeout(timeout_s):
            while True:
                for event in self.events:
                    if event["type"] == kind:
                        self.events.remove(event)
                        return event
                msg = await self.ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                self.events.append(json.loads(msg.data))

    async def typed_turn(self, text: str) -> dict:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        await self.ws.send_json({"type": "conversation.item.create", "item": item})
        await self.ws.send_json({"type": "response.create"})
        return await self.wait_for("response.done")

    def drop(self) -> None:
        """The connection goes without a close frame (a lost network path, a killed client)."""
        self.ws.get_extra_info("socket").shutdown(socket.SHUT_RDWR)


async def _socket(http: aiohttp.ClientSession, base_url: str, token: str | None = None) -> SocketClient:
    ws = await http.ws_connect(
        f"{base_url}/v1/realtime",
        params={"glm4voice_events": "on"},  # the resume events are ours
        headers={RESUME_HEADER: token} if token else {},
    )
    return SocketClient(ws)


async def _the_call_closed(running, call_id: str):
    call = running.server.calls[call_id]
    await asyncio.wait_for(call.closed.wait(), 5)
    return call


async def test_websocket_call_resumes_after_its_socket_drops(echo_server):
    async with aiohttp.ClientSession() as http:
        first = await _socket(http, echo_server.base_url)
        created = await first.wait_for("session.created")
        token = created["resume_token"]
        assert token and created["resume_window_s"] == 60
        assert (await first.typed_turn("Remember the word apricot."))["response"]["status"] == "completed"
        first.drop()
        old = await _the_call_closed(echo_server, created["session"]["id"])
        assert old.close_reason == "websocket lost" and not old.session.closed
        assert len(echo_server.server.parked) == 1

        second = await _socket(http, echo_server.base_url, token)
        try:
            new_token = (await second.wait_for("session.created"))["resume_token"]
            assert (await second.wait_for("glm4voice.session.resumed"))["items"] == 2
            assert new_token != token and len(echo_server.server.parked) == 0
            call = next(iter(echo_server.server.calls.values()))
            assert call.session is old.session
            done = await second.typed_turn("Which word was it?")
            assert done["response"]["status"] == "completed"
            assert [e.role for e in call.session.history] == ["user", "assistant"] * 2
        finally:
            await second.ws.close()
        await asyncio.wait_for(call.closed.wait(), 5)
        assert call.session.closed and len(echo_server.server.parked) == 0  # a normal closure ends it

        again = await _socket(http, echo_server.base_url, token)  # single use
        try:
            await again.wait_for("session.created")
            assert (await again.wait_for("glm4voice.session.resume_failed"))["reason"] == "already_resumed"
        finally:
            await again.ws.close()


async def test_websocket_normal_closure_does_not_park(echo_server):
    async with aiohttp.ClientSession() as http:
        client = await _socket(http, echo_server.base_url)
        created = await client.wait_for("session.created")
        call = echo_server.server.calls[created["session"]["id"]]
        await client.ws.close()  # code 1000
        await asyncio.wait_for(call.closed.wait(), 5)
        assert call.session.closed and len(echo_server.server.parked) == 0
        late = await _socket(http, echo_server.base_url, created["resume_token"])
        try:
            await late.wait_for("session.created")
            assert (await late.wait_for("glm4voice.session.resume_failed"))["reason"] == "unknown"
        finally:
            await late.ws.close()

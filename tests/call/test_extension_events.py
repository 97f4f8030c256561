"""Our `glm4voice.*` events are opt-in, alike on both doors (docs/protocol.md "Extension events"): a client
that connects as it would to OpenAI gets OpenAI's event types only, `?glm4voice_events=on` gets ours too,
any other value is refused before a call starts. Control connections get ours unless they say `off`.

Each call is a real one on the echo server that produces our events: a `glm4voice.ping` (its pong) and a
typed turn (its reply's `glm4voice.turn.latency`). Two control connections on the call, one with the
default and one with `off`, show that the server did send them and who they reached."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.helpers.rtc_client import RealtimeClient

TURN = [
    {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]},
    },
    {"type": "response.create"},
]
OURS = {"glm4voice.pong", "glm4voice.turn.latency"}  # what the ping and the turn make the server send
TIMEOUT_S = 10.0


class Socket:
    """A WebSocket that records the types of the events it receives, in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.types: list[str] = []
        self._new = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            self.types.append(json.loads(msg.data)["type"])
            self._new.set()

    async def until(self, *kinds: str) -> list[str]:
        """The types received once every one of `kinds` has come."""
        async with asyncio.timeout(TIMEOUT_S):
            while not set(kinds) <= set(self.types):
                self._new.clear()
                await self._new.wait()
        return self.types

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


class Caller:
    """The call's client on either door: `send`, and `until` as `Socket.until`."""

    def __init__(self, rtc: RealtimeClient | None = None, socket: Socket | None = None) -> None:
        self.rtc, self.socket = rtc, socket

    async def send(self, event: dict) -> None:
        if self.rtc is not None:
            self.rtc.send(event)
        else:
            await self.socket.ws.send_json(event)

    async def until(self, *kinds: str) -> list[str]:
        if self.socket is not None:
            return await self.socket.until(*kinds)
        for kind in kinds:
            await self.rtc.wait_for(kind, TIMEOUT_S)
        return [e["type"] for e in self.rtc.events]

    async def close(self) -> None:
        if self.rtc is not None:
            await self.rtc.hangup()
        else:
            await self.socket.close()


def _ws(base_url: str) -> str:
    return "ws" + base_url[len("http") :] + "/v1/realtime"


async def _caller(door: str, base_url: str, http: aiohttp.ClientSession, opt_in: bool) -> Caller:
    if door == "webrtc":
        rtc = RealtimeClient(base_url, glm4voice_events=opt_in)
        await rtc.connect(listen_only=True)
        return Caller(rtc=rtc)
    params = {"glm4voice_events": "on"} if opt_in else {}
    return Caller(socket=Socket(await http.ws_connect(_ws(base_url), params=params)))


@pytest.mark.parametrize("opt_in", [False, True], ids=["unmodified", "on"])
@pytest.mark.parametrize("door", ["webrtc", "websocket"])
async def test_only_clients_that_ask_get_our_events(echo_server, door, opt_in):
    async with aiohttp.ClientSession() as http:
        caller = await _caller(door, echo_server.base_url, http, opt_in)
        controls: dict[str, Socket] = {}
        try:
            (call_id,) = echo_server.server.calls
            for name, params in (("default", {}), ("off", {"glm4voice_events": "off"})):
                url = _ws(echo_server.base_url)
                ws = await http.ws_connect(url, params={"call_id": call_id, **params})
                controls[name] = Socket(ws)
            await caller.until("session.created")
            await caller.send({"type": "glm4voice.ping", "event_id": "evt_ping"})
            for event in TURN:
                await caller.send(event)
            # the server sent ours: the control connection that takes them has them
            assert OURS <= set(await controls["default"].until(*OURS, "response.done"))
            await caller.until("response.done")
            # everything sent before the answer to this update has reached the client (events are ordered)
            await caller.send({"type": "session.update", "session": {"instructions": "be brief"}})
            received = await caller.until("response.done", "session.updated")
            ours = {kind for kind in received if kind.startswith("glm4voice.")}
            assert ours == (OURS if opt_in else set()), received
            # a control connection that says off: the call's events, none of ours
            off = await controls["off"].until("response.done", "session.updated")
            assert not [kind for kind in off if kind.startswith("glm4voice.")], off
        finally:
            for control in controls.values():
                await control.close()
            await caller.close()


async def test_both_doors_refuse_other_values(echo_server):
    offer = "v=0\r\n"  # refused for its value before the SDP is read
    async with aiohttp.ClientSession() as http:
        for value in ("maybe", "ON", "1", ""):
            params = {"glm4voice_events": value}
            async with http.post(
                f"{echo_server.base_url}/v1/realtime/calls",
                data=offer,
                params=params,
                headers={"Content-Type": "application/sdp"},
            ) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_value"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(_ws(echo_server.base_url), params=params)
            assert refused.value.status == 400
    assert echo_server.server.calls == {}

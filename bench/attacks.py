"""The attacks of bench/bench_attack.py, run in a process of their own (`--attacker BASE`) so that the
attacker's CPU use and event loop do not distort the victim's timings in the bench's process.

The process reads one line per phase on stdin, `KIND SECONDS`, answers `go` when the attack starts and
one JSON object of notes (counters: what was sent, what the server answered, how it ended the attacker's
calls) when it is over. Every attack comes from its own loopback address (127.0.0.N), as another client
would, so that the per-address limits see it apart from the victim at 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import av
import numpy as np

from tests.helpers.rtc_client import FRAME, RATE_48K, MicTrack, RealtimeClient, make_offer

API_KEY = "bench-attack-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = (
    "x" * 3990
)  # within max_text_chars / max_instructions_chars (4000); one token a character on demo weights
TURN_TEXT = "y" * 1500  # a typed message for the history attacks: three turns of it fit the context
TURN_TOKENS = 60  # max_output_tokens of the history attacks' replies (2/3 of them speech, 80 ms each)
RESUME_HEADER = "X-GLM4Voice-Resume-Token"


@dataclass
class Attack:
    base: str  # http://127.0.0.1:PORT
    address: str  # the attacker's own source address
    end_s: float  # time.monotonic() when the phase ends
    notes: Counter = field(default_factory=Counter)

    @property
    def ws_url(self) -> str:
        return "ws" + self.base[len("http") :] + "/v1/realtime"

    def live(self) -> bool:
        return time.monotonic() < self.end_s

    def http(self, address: str | None = None) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(local_addr=(address or self.address, 0), limit=0)
        return aiohttp.ClientSession(connector=connector)

    def client(self, headers: dict | None = None, **kwargs) -> RealtimeClient:
        return RealtimeClient(self.base, headers=headers or AUTH, local_address=self.address, **kwargs)

    async def call(self, client: RealtimeClient | None = None) -> RealtimeClient | None:
        """A WebRTC call (listen only: typed turns, spoken replies), or None when refused (counted)."""
        client = client or self.client()
        try:
            await client.connect(listen_only=not isinstance(client.mic, FloodMic))
        except AssertionError as exc:  # RealtimeClient: the offer was not answered 201
            self.refused(str(exc))
            await client.close()
            await asyncio.sleep(0.5)
            return None
        self.notes["calls"] += 1
        return client

    def refused(self, text: str) -> None:
        code = re.search(r'"code":\s*"(\w+)"', text)
        self.notes[f"refused {code.group(1) if code else text[:40]}"] += 1


class FloodMic(MicTrack):
    """A microphone `speedup` times faster than real time."""

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


def _item(text: str) -> dict:
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
    }


async def _read_events(a: Attack, ws: aiohttp.ClientWebSocketResponse) -> None:
    """Count what the server sends back (error codes, replies) and how it closes the socket."""
    while True:
        msg = await ws.receive()
        if msg.type == aiohttp.WSMsgType.TEXT:
            event = json.loads(msg.data)
            if event["type"] == "error":
                a.notes[f"error {event['error']['code']}"] += 1
            elif event["type"] in ("response.created", "glm4voice.call.closing"):
                a.notes[event["type"] + (f" {event['reason']}" if "reason" in event else "")] += 1
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            reason = msg.extra if isinstance(msg.extra, str) else type(msg.extra).__name__
            a.notes[f"closed by the server: {ws.close_code} {reason[:50]}"] += 1
            return


async def _socket(
    a: Attack, http: aiohttp.ClientSession, query: str = "", headers: dict | None = None, pause_s: float = 0.5
):
    """A WebSocket to /v1/realtime, or None when the upgrade is refused (counted by status; then a pause)."""
    try:
        return await http.ws_connect(
            a.ws_url + query, headers=headers or AUTH, protocols=("realtime",), max_msg_size=0
        )
    except aiohttp.WSServerHandshakeError as exc:
        a.notes[f"refused {exc.status}"] += 1
        await asyncio.sleep(pause_s)
        return None


# ----- WebSocket append floods ------------------------------------------------------------------------


async def ws_append_flood(a: Attack, audio_b64: str) -> None:
    """`input_audio_buffer.append` as fast as the socket takes it; a call the server ends is dialled again."""
    message = json.dumps({"type": "input_audio_buffer.append", "audio": audio_b64})
    async with a.http() as http:
        while a.live():
            ws = await _socket(a, http, "?glm4voice_events=on")  # _read_events counts call.closing
            if ws is None:
                continue
            a.notes["calls"] += 1
            reader = asyncio.ensure_future(_read_events(a, ws))
            try:
                while a.live() and not ws.closed and not reader.done():
                    await ws.send_str(message)
                    a.notes["appends sent"] += 1
                    if a.notes["appends sent"] % 64 == 0:
                        await asyncio.sleep(0)  # let the reader see a close
            except (ConnectionError, RuntimeError) as exc:
                a.notes[f"send failed {type(exc).__name__}"] += 1
            reader.cancel()
            await ws.close()


def ws_tiny(a: Attack) -> Awaitable[None]:
    return ws_append_flood(a, base64.b64encode(b"\0\0").decode())


def ws_empty(a: Attack) -> Awaitable[None]:
    return ws_append_flood(a, "")


def ws_1mib(a: Attack) -> Awaitable[None]:
    return ws_append_flood(a, base64.b64encode(bytes(780_000)).decode())  # ~1 MiB as JSON, under the cap


def ws_bad_base64(a: Attack) -> Awaitable[None]:
    return ws_append_flood(a, "!!!!")


# ----- control connections -----------------------------------------------------------------------------


async def _control(a: Attack, batch: Callable[[int], list[dict]], per_s: float) -> None:
    """A WebRTC call of the attacker's, steered through a control connection: `batch(i)` every 1/per_s s."""
    async with a.http() as http:
        while a.live():
            client = await a.call()
            if client is None:
                continue
            ws = await _socket(a, http, f"?call_id={client.call_id}")
            if ws is not None:
                reader = asyncio.ensure_future(_read_events(a, ws))
                i = 0
                while a.live() and not ws.closed and not reader.done():
                    i += 1
                    for event in batch(i):
                        await ws.send_str(json.dumps(event))
                    a.notes["batches sent"] += 1
                    await asyncio.sleep(1 / per_s)
                reader.cancel()
                await ws.close()
            await client.hangup()


def control_churn(a: Attack) -> Awaitable[None]:
    """New instructions + a message + response.create (+ cancel), 8 times a second."""

    def batch(i: int) -> list[dict]:
        return [
            {"type": "session.update", "session": {"instructions": f"{i:08d}{'z' * 1000}"}},
            _item("tell me something about rivers."),
            {"type": "response.create"},
            {"type": "response.cancel"},
        ]

    return _control(a, batch, 8.0)


def context_overflow(a: Attack) -> Awaitable[None]:
    """Instructions and a message each within its limit, together over the context, 40 times a second."""

    def batch(i: int) -> list[dict]:
        return [
            {"type": "session.update", "session": {"instructions": f"{i:08d}{LONG}"}},
            _item(LONG),
            {"type": "response.create"},
        ]

    return _control(a, batch, 40.0)


async def control_logins(a: Attack) -> None:
    """Control connections with a wrong key, one after another (as an online key search would)."""
    async with a.http() as http:
        i = 0
        while a.live():
            i += 1
            ws = await _socket(a, http, f"?call_id=rtc_{i:024x}", {"Authorization": f"Bearer wrong-{i}"}, 0.0)
            if ws is not None:
                a.notes["accepted"] += 1
                await ws.close()


# ----- history edits -----------------------------------------------------------------------------------


class Turns:
    """The attacker's own turns (user item id, assistant item id, audio left to truncate in ms)."""

    def __init__(self, a: Attack, client: RealtimeClient) -> None:
        self.a, self.client = a, client
        self.turns: list[list] = []

    async def add(self) -> bool:
        client, mark = self.client, len(self.client.events)
        client.send(_item(TURN_TEXT))
        client.send({"type": "response.create"})
        try:
            done = await client.wait_for("response.done", 30, after=mark)
        except TimeoutError:
            self.a.notes["turn timed out"] += 1
            return False
        users = [
            e["item"]["id"]
            for e in client.events[mark:]
            if e["type"] == "conversation.item.added" and e["item"]["role"] == "user"
        ]
        output = done["response"].get("output") or [{}]
        if not users or "id" not in output[0]:
            self.a.notes[f"turn {done['response']['status']}"] += 1
            await asyncio.sleep(1.0)
            return False
        self.turns.append([users[-1], output[0]["id"], TURN_TOKENS * 2 // 3 * 80])
        self.a.notes["turns added"] += 1
        return True


async def _history_attack(a: Attack, work: Callable[[Turns], Awaitable[None]]) -> None:
    while a.live():
        client = await a.call()
        if client is None:
            continue
        client.send({"type": "session.update", "session": {"max_output_tokens": TURN_TOKENS}})
        turns = Turns(a, client)
        while a.live() and len(turns.turns) < 2:
            await turns.add()
        while a.live() and not client.of_type("glm4voice.call.closing"):
            await work(turns)
        for event in client.of_type("error"):
            a.notes[f"error {event['error']['code']}"] += 1
        await client.hangup()


async def _truncate_one(turns: Turns) -> None:
    """Cut the oldest reply that has audio left by one speech token (80 ms), 19 times a second: every cut
    changes the history before the newer turns, which the engine prefills again."""
    turn = next((t for t in turns.turns if t[2] > 0), None)
    if turn is None:
        await turns.add()
        return
    turn[2] -= 80
    turns.client.send(
        {
            "type": "conversation.item.truncate",
            "item_id": turn[1],
            "content_index": 0,
            "audio_end_ms": turn[2],
        }
    )
    turns.a.notes["truncates sent"] += 1
    await asyncio.sleep(1 / 19)


async def _delete_oldest(turns: Turns) -> None:
    """Add a turn, then delete the oldest turn's two items (each a re-prefill of the turns after it)."""
    await turns.add()
    while len(turns.turns) > 2:
        user, assistant, _ = turns.turns.pop(0)
        for item_id in (user, assistant):
            turns.client.send({"type": "conversation.item.delete", "item_id": item_id})
            turns.a.notes["deletes sent"] += 1


def truncate_churn(a: Attack) -> Awaitable[None]:
    return _history_attack(a, _truncate_one)


def delete_churn(a: Attack) -> Awaitable[None]:
    return _history_attack(a, _delete_oldest)


# ----- calls, channels, secrets, connections -------------------------------------------------------------


async def parked_calls(a: Attack) -> None:
    """Calls whose client goes without a hangup (closed as a killed browser would): each one parks."""
    while a.live():
        client = await a.call()
        if client is not None:
            await client.close()


async def channel_labels(a: Attack) -> None:
    """Data channels with 60 KB labels that are not `oai-events`, as fast as the client makes them."""
    while a.live():
        client = await a.call()
        if client is None:
            continue
        while a.live() and client.pc.connectionState == "connected":
            client.pc.createDataChannel(f"{a.notes['channels opened']:06d}" + "L" * 60_000)
            a.notes["channels opened"] += 1
            await asyncio.sleep(0.002)
        await client.hangup()


async def big_mints(a: Attack, addresses: int = 20) -> None:
    """Client secrets whose `session` carries ~50 KB of ignored fields (5000 keys: ~0.5 MB as Python
    objects), from 20 addresses in turn."""
    junk = {f"k{i}": 0 for i in range(5_000)}
    body = json.dumps({"session": {"instructions": "hello", "junk": junk}}, separators=(",", ":"))
    prefix = a.address.rsplit(".", 1)[0]
    sessions = [a.http(f"{prefix}.{100 + i}") for i in range(addresses)]
    try:
        i = 0
        while a.live():
            i += 1
            async with sessions[i % addresses].post(
                a.base + "/v1/realtime/client_secrets",
                data=body,
                headers={**AUTH, "Content-Type": "application/json"},
            ) as r:
                a.notes[f"mint {r.status}"] += 1
            if i % addresses == 0:
                await asyncio.sleep(0.05)
    finally:
        await asyncio.gather(*(s.close() for s in sessions))


async def refused_connections(a: Attack) -> None:
    """Hold the per-address cap of idle connections, then connect again and again: each is refused."""
    host, port = a.base.rsplit("/", 1)[1].split(":")
    held = []
    for _ in range(40):
        held.append(await asyncio.open_connection(host, int(port), local_addr=(a.address, 0)))
    try:
        while a.live():
            reader, writer = await asyncio.open_connection(host, int(port), local_addr=(a.address, 0))
            head = await reader.read(64)
            status = head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else "none"
            a.notes[f"connection answered {status}"] += 1
            writer.close()
    finally:
        for _, writer in held:
            writer.close()


async def refused_resumes(a: Attack) -> None:
    """An offer that fails the SDP checks carrying the attacker's live call's resume token; then, once that
    call parked, an offer aiortc refuses (`a=setup:bogus`) with its token; then a good resume."""
    offer = await make_offer()
    bad = {
        "no_fingerprint": re.sub(r"^a=fingerprint:.*\r\n", "", offer, flags=re.MULTILINE),
        "aiortc_refuses": offer.replace("a=setup:actpass", "a=setup:bogus"),
    }
    async with a.http() as http:

        async def offer_with(token: str, sdp: str) -> None:
            body = {"sdp": sdp, "type": "offer", "resume_token": token}
            async with http.post(a.base + "/v1/realtime/calls", json=body, headers=AUTH) as r:
                a.notes[f"bad resume offer {r.status}"] += 1

        while a.live():
            live = await a.call()
            if live is None:
                continue
            token = (await live.wait_for("session.created", 10))["resume_token"]
            await offer_with(token, bad["no_fingerprint"])
            await asyncio.sleep(0.5)
            a.notes[f"live call after a refused resume: {live.pc.connectionState}"] += 1
            await live.close()  # dropped without a hangup: parked
            await asyncio.sleep(0.5)
            await offer_with(token, bad["aiortc_refuses"])
            again = await a.call(a.client(headers={**AUTH, RESUME_HEADER: token}))
            if again is not None:
                await asyncio.sleep(0.3)
                kinds = {e["type"] for e in again.events}
                outcome = [
                    k for k in ("glm4voice.session.resumed", "glm4voice.session.resume_failed") if k in kinds
                ]
                a.notes[f"then a good resume: {outcome[0] if outcome else 'no answer'}"] += 1
                await again.hangup()


# ----- the first round of attacks (kept for comparison) -----------------------------------------------


async def typed_flood(a: Attack) -> None:
    """4000-character typed messages paced under the event rate, then `response.create`, repeated."""
    while a.live():
        client = await a.call()
        if client is None:
            continue
        while a.live() and client.pc.connectionState == "connected":
            for _ in range(60):
                client.send(_item(LONG))
                await asyncio.sleep(1 / 15)
            client.send({"type": "response.create"})
        await client.hangup()


async def instructions_churn(a: Attack) -> None:
    """New 4000-character instructions + a message + `response.create` + `response.cancel`, 4 times a
    second."""
    while a.live():
        client = await a.call()
        if client is None:
            continue
        i = 0
        while a.live() and client.pc.connectionState == "connected":
            i += 1
            client.send({"type": "session.update", "session": {"instructions": f"{i:08d}{LONG}"}})
            client.send(_item(LONG))
            client.send({"type": "response.create"})
            client.send({"type": "response.cancel"})
            await asyncio.sleep(0.25)
        await client.hangup()


async def opus_flood(a: Attack) -> None:
    """Opus at 20x real time; a call the server ends is dialled again."""
    while a.live():
        client = await a.call(a.client(mic=FloodMic(20.0)))
        if client is None:
            continue
        while a.live() and not client.of_type("glm4voice.call.closing"):
            await asyncio.sleep(0.2)
        for event in client.of_type("glm4voice.call.closing"):
            a.notes[f"closing {event['reason']}"] += 1
        await client.hangup()


ATTACKS: dict[str, tuple[Callable[[Attack], Awaitable[None]], str]] = {
    "ws_tiny": (ws_tiny, "WebSocket appends of 2 bytes, as fast as they go"),
    "ws_empty": (ws_empty, "WebSocket appends with empty audio"),
    "ws_1mib": (ws_1mib, "WebSocket appends of ~1 MiB"),
    "ws_bad_b64": (ws_bad_base64, "WebSocket appends of invalid base64"),
    "control": (control_churn, "control connection: new instructions + message + response.create, 8/s"),
    "control_logins": (control_logins, "control connections with wrong keys, back to back"),
    "truncate": (truncate_churn, "truncate the oldest reply 80 ms further, 19/s"),
    "delete": (delete_churn, "add a turn, delete the oldest turn's items"),
    "labels": (channel_labels, "data channels with 60 KB labels"),
    "mints": (big_mints, "client secrets with 50 KB sessions, 20 addresses"),
    "conns": (refused_connections, "connections over the per-address cap"),
    "overflow": (context_overflow, "control connection: 4000-char instructions + message, 40/s"),
    "resume": (refused_resumes, "refused resumes (live call's token; parked call's token)"),
    "typed_flood": (typed_flood, "4000-char messages at 15/s, response.create after every 60"),
    "instructions": (instructions_churn, "4000-char instructions + message + create + cancel, 4/s"),
    "opus_flood": (opus_flood, "Opus at 20x real time, redialled"),
    "parked": (
        parked_calls,
        "calls dropped without a hangup (parked; run last), at the offer rate",
    ),
}


async def serve_attacks(base: str) -> None:
    """The attacker process: `KIND SECONDS` on stdin -> `go`, then the notes as JSON, on stdout."""
    from server.webrtc.rtc import set_host_addresses

    set_host_addresses(("127.0.0.1",))
    loop = asyncio.get_running_loop()
    n = 0
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        kind, seconds = line.split()
        n += 1
        attack = Attack(base, f"127.0.0.{10 + n}", time.monotonic() + float(seconds))
        print("go", flush=True)
        work = loop.create_task(ATTACKS[kind][0](attack))
        try:
            await asyncio.wait_for(asyncio.shield(work), float(seconds) + 20)
        except TimeoutError:
            attack.notes["stopped at the deadline"] += 1
            work.cancel()
        except Exception as exc:  # noqa: BLE001 - an attack that breaks is reported, the run goes on
            attack.notes[f"attack failed: {type(exc).__name__}: {str(exc)[:60]}"] += 1
        print(json.dumps(dict(attack.notes)), flush=True)

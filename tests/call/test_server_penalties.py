"""The penalty box at the server's doors (server/edge/penalties.py, docs/robustness.md): an address that
keeps being refused is refused at the TCP accept for a while; other addresses and its own calls in
progress are not touched. Each client here has its own loopback address (127.0.0.0/8 is all loopback)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import aiohttp

from server.edge.penalties import ABUSE_ENDINGS
from tests.helpers.rtc_client import start_server

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
STRIKES = 6


def _ws_url(running) -> str:
    return "ws" + running.base_url[len("http") :] + "/v1/realtime"


def _session(address: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), force_close=True))


async def _raw_answer(running, address: str) -> bytes:
    """What the server says to a connection from `address` that sends nothing."""
    host, port = running.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(address, 0))
    try:
        return await asyncio.wait_for(reader.read(4096), 5)
    except TimeoutError:
        return b""
    finally:
        writer.close()


async def _wrong_keys(running, address: str, n: int) -> list[int]:
    statuses = []
    async with _session(address) as http:
        for i in range(n):
            headers = {"Authorization": f"Bearer wrong-{i}"}
            async with http.post(
                f"{running.base_url}/v1/realtime/client_secrets", json={}, headers=headers
            ) as r:
                statuses.append(r.status)
    return statuses


def _errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_wrong_keys_block_the_address_at_the_accept_and_nobody_else(caplog):
    limits = {
        "penalty_strikes": STRIKES,
        "penalty_decay_per_s": 0.0,
        "penalty_s": 30.0,
        "penalty_max_s": 60.0,
    }
    running = await start_server(overrides={"limits": limits, "auth": {"api_key": KEY}})
    caplog.set_level(logging.INFO)
    try:
        async with _session("127.0.0.3") as http, http.ws_connect(_ws_url(running), headers=AUTH) as call:
            first = json.loads((await call.receive(timeout=5)).data)
            assert first["type"] == "session.created"  # a call from the address, before its block

            statuses = await _wrong_keys(running, "127.0.0.3", STRIKES + 2)
            assert statuses == [401] * STRIKES + [429, 429]

            answer = await _raw_answer(running, "127.0.0.3")  # refused before any request is read
            assert answer.startswith(b"HTTP/1.1 429 "), answer[:80]
            head, _, body = answer.partition(b"\r\n\r\n")
            retry = int(
                next(h for h in head.split(b"\r\n") if h.lower().startswith(b"retry-after:")).split(b":")[1]
            )
            assert 1 <= retry <= 30
            assert json.loads(body)["error"]["code"] == "rate_limited"
            async with (
                _session("127.0.0.3") as other,
                other.post(
                    f"{running.base_url}/v1/realtime/client_secrets", json={}, headers=AUTH
                ) as refused,
            ):
                assert refused.status == 429  # the right key too: the address waits

            async with (
                _session("127.0.0.4") as other,
                other.post(f"{running.base_url}/v1/realtime/client_secrets", json={}, headers=AUTH) as minted,
            ):
                assert minted.status == 200  # another address is served
            assert await _raw_answer(running, "127.0.0.4") == b""  # and may connect and take its time

            await call.send_json({"type": "session.update", "session": {"instructions": "still here"}})
            while (event := json.loads((await call.receive(timeout=5)).data))["type"] != "session.updated":
                pass
            assert event["session"]["instructions"] == "still here"  # its call in progress goes on
        metrics = running.server.metrics
        assert metrics.value("glm4voice_address_blocks_total") == 1
        assert metrics.value("glm4voice_blocked_refusals_total") >= 2
        blocked_lines = [r for r in caplog.records if "blocked for" in r.getMessage()]
        assert len(blocked_lines) == 1 and blocked_lines[0].levelno == logging.WARNING
        assert not _errors(caplog)
    finally:
        await running.runner.cleanup()


async def test_behind_a_proxy_the_block_is_per_forwarded_address(caplog):
    """With `trust_forwarded_for`, the TCP peer is the proxy: connections are never refused for its
    address; the client named by X-Forwarded-For is refused per request, and other clients of the same
    proxy are served."""
    running = await start_server(
        overrides={
            "limits": {"penalty_strikes": STRIKES, "penalty_decay_per_s": 0.0, "penalty_s": 30.0},
            "auth": {"api_key": KEY},
            "http": {"trust_forwarded_for": True},
        }
    )
    mint = f"{running.base_url}/v1/realtime/client_secrets"
    try:
        async with _session("127.0.0.5") as proxy:
            for i in range(STRIKES):
                headers = {"Authorization": f"Bearer wrong-{i}", "X-Forwarded-For": "203.0.113.9"}
                async with proxy.post(mint, json={}, headers=headers) as response:
                    assert response.status == 401
            blocked = {**AUTH, "X-Forwarded-For": "203.0.113.9"}
            async with proxy.post(mint, json={}, headers=blocked) as response:
                assert response.status == 429 and "blocked" in (await response.json())["error"]["message"]
            served = {**AUTH, "X-Forwarded-For": "198.51.100.7"}
            async with proxy.post(mint, json={}, headers=served) as response:
                assert response.status == 200
        assert await _raw_answer(running, "127.0.0.5") == b""
        assert not _errors(caplog)
    finally:
        await running.runner.cleanup()


async def test_a_call_ended_for_abuse_is_a_heavy_strike(caplog):
    """A WebSocket call flooding appends is ended (`inbound_flood`); with `penalty_strikes` at one such
    ending's weight, its address is then blocked."""
    strikes = ABUSE_ENDINGS["inbound_flood"]
    limits = {
        "inbound_flood_s": 1.0,
        "penalty_strikes": strikes,
        "penalty_decay_per_s": 0.0,
        "penalty_s": 30.0,
    }
    running = await start_server(overrides={"limits": limits})
    message = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0\0").decode()})
    try:
        async with _session("127.0.0.6") as http, http.ws_connect(_ws_url(running)) as ws:
            for _ in range(200_000):
                try:
                    await ws.send_str(message)
                except ConnectionError:
                    break
                if ws.closed:
                    break
                await asyncio.sleep(0)
            while not ws.closed:
                await ws.receive(timeout=5)
        for _ in range(50):  # the call's clean-up runs after the socket closes
            if not running.server.calls:
                break
            await asyncio.sleep(0.1)
        assert running.server.metrics.value("glm4voice_calls_ended_total", reason="inbound_flood") == 1
        assert (await _raw_answer(running, "127.0.0.6")).startswith(b"HTTP/1.1 429 ")
        assert await _raw_answer(running, "127.0.0.7") == b""
        assert not _errors(caplog)
    finally:
        await running.runner.cleanup()

"""Hostile callers vs. a victim call (docs/robustness.md), and leaks after the reproductions.

    .venv/bin/python bench/bench_attack.py [--phase-s 35]

The server runs as its own process (GLM engine on demo weights, CPU unless GLM4VOICE_MODEL_DEVICE says
otherwise; default limits except the per-address call rate, off because every client is 127.0.0.1).
A victim call types a short message and asks for a reply, again and again; its first audio is the time
from its `response.create` to the `output_audio_buffer.started` it receives. One phase per attack, in
one run: none (baseline), then
  2a  typed 4000-character messages paced under the event rate, then `response.create`, repeated;
  2b  new 4000-character instructions + a message + `response.create` + `response.cancel`, 4 times a second;
  6   Opus at 20x real time (a call the server ends is dialled again at once).
Then the other hostile-client reproductions of docs/robustness.md run once each (malformed events, bad offers,
1000 ICE candidates, malformed HTTP), every call is hung up, and the server's fds, threads, asyncio tasks and
RSS are read again. Prints the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_call_path import free_port, machine, pct, wait_healthy

LONG = "x" * 3990


# ----- the server process, with a probe route for the leak figures ----------------------------------


async def _serve(port: int) -> None:
    import psutil
    from aiohttp import web

    from server.app import create_app
    from server.config import load_config
    from server.edge.connections import start_site

    config = load_config(None)
    app = create_app(config)
    me = psutil.Process()

    async def leaks(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "fds": me.num_fds(),
                "threads": threading.active_count(),
                "tasks": len(asyncio.all_tasks()),
                "rss_mib": round(me.memory_info().rss / 2**20, 1),
            }
        )

    app.router.add_get("/bench/leaks", leaks)
    runner, _ = await start_site(app, config, "127.0.0.1", port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


# ----- clients ------------------------------------------------------------------------------------


def _item(text: str) -> dict:
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
    }


async def victim(base: str, end_s: float, first_audio_ms: list[float], misses: list[int]) -> None:
    from tests.helpers.rtc_client import RealtimeClient

    client = RealtimeClient(base)
    await client.connect()
    try:
        while time.monotonic() < end_s:
            mark = len(client.events)
            client.send(_item("hello, how are you today?"))
            client.send({"type": "response.create"})
            t0 = time.monotonic()
            try:
                started = await client.wait_for("output_audio_buffer.started", 60, after=mark)
                first_audio_ms.append((client.event_time(started) - t0) * 1000)
                await client.wait_for("output_audio_buffer.stopped", 60, after=mark)
            except TimeoutError:
                misses.append(1)
            await asyncio.sleep(0.5)
    finally:
        await client.hangup()


async def attack_2a(client, end_s: float) -> None:
    while time.monotonic() < end_s:
        for _ in range(60):
            client.send(_item(LONG))
            await asyncio.sleep(1 / 15)  # under the 20 events/s limit
        client.send({"type": "response.create"})


async def attack_2b(client, end_s: float) -> None:
    i = 0
    while time.monotonic() < end_s:
        i += 1
        client.send({"type": "session.update", "session": {"instructions": f"{i:08d}{LONG}"}})
        client.send(_item(LONG))
        client.send({"type": "response.create"})
        client.send({"type": "response.cancel"})
        await asyncio.sleep(0.25)


async def attacker(base: str, kind: str, end_s: float) -> int:
    """Runs the attack until end_s, dialling again when the server ends the call. -> calls made."""
    from tests.call.test_server_hostile_events import FloodMic
    from tests.helpers.rtc_client import RealtimeClient

    calls = 0
    while time.monotonic() < end_s:
        client = RealtimeClient(base, mic=FloodMic(20.0)) if kind == "6" else RealtimeClient(base)
        calls += 1
        try:
            await client.connect()
            work = {"2a": attack_2a, "2b": attack_2b}.get(kind)
            if work is not None:
                await work(client, end_s)
            else:
                while time.monotonic() < end_s and not client.of_type("glm4voice.call.closing"):
                    await asyncio.sleep(0.2)
        except Exception as exc:  # a refused or dropped call: dial again
            print(f"  attacker {kind}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)
        finally:
            await client.hangup()
    return calls


async def reproductions(base: str) -> None:
    """The other hostile-client reproductions, once each (for the leak figures)."""
    from tests.call.test_server_hostile_events import MALFORMED, _send_not_utf8, _with_candidates
    from tests.helpers.rtc_client import RealtimeClient, make_offer

    client = RealtimeClient(base)
    await client.connect()
    for message in MALFORMED.values():
        client.send(message)
    _send_not_utf8(client, b"\xff\xfe")
    await asyncio.sleep(1.0)
    await client.hangup()
    offer = await make_offer()
    bad_offers = [
        re.sub(rf"^a={a}:.*\r\n", "", offer, flags=re.MULTILINE) for a in ("fingerprint", "ice-ufrag")
    ]
    bad_offers.append(offer.replace("a=mid:0", "a=mid:x"))
    async with aiohttp.ClientSession() as http:
        for sdp in bad_offers:
            async with http.post(
                base + "/v1/realtime/calls", data=sdp, headers={"Content-Type": "application/sdp"}
            ):
                pass
        flood = [
            f"a=candidate:f{i} 1 udp 2113937151 127.0.0.{2 + i % 200} {20_000 + i} typ host"
            for i in range(1000)
        ]
        async with http.post(
            base + "/v1/realtime/calls",
            data=_with_candidates(offer, flood),
            headers={"Content-Type": "application/sdp"},
        ) as r:
            location = r.headers.get("Location")
        if location:
            async with http.post(base + location + "/hangup"):
                pass
    port = int(base.rsplit(":", 1)[1])
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nnot a header\r\n\r\n")
        await reader.read()
        writer.close()


async def run(args: argparse.Namespace) -> None:
    from server.webrtc.rtc import set_host_addresses

    port = free_port()
    demo_dir = Path(tempfile.gettempdir()) / "glm4voice_bench_demo"
    env = {
        **os.environ,
        "GLM4VOICE_WEBRTC_HOST_ADDRESSES": "127.0.0.1",
        "GLM4VOICE_LIMITS_CALLS_PER_MINUTE_PER_ADDRESS": "0",
        "GLM4VOICE_MODEL_DEVICE": os.environ.get("GLM4VOICE_MODEL_DEVICE", "cpu"),
        "GLM4VOICE_MODEL_DEMO_WEIGHTS_DIR": os.environ.get("GLM4VOICE_MODEL_DEMO_WEIGHTS_DIR", str(demo_dir)),
    }
    log_path = Path(tempfile.gettempdir()) / f"glm4voice_bench_attack_{port}.log"
    log_file = open(log_path, "w")  # noqa: SIM115 - the server's whole life
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)], cwd=ROOT, env=env, stderr=log_file
    )
    base = f"http://127.0.0.1:{port}"
    set_host_addresses(("127.0.0.1",))
    rows = []
    try:
        async with aiohttp.ClientSession() as http:
            health = await wait_healthy(http, base, server)

            async def leaks() -> dict:
                await asyncio.sleep(2.0)
                async with http.get(base + "/bench/leaks") as r:
                    return await r.json()

            await victim(base, time.monotonic() + 5, [], [])  # warm-up
            before = await leaks()
            for kind in ("none", "2a", "2b", "6"):
                end_s = time.monotonic() + args.phase_s
                first_audio_ms: list[float] = []
                misses: list[int] = []
                work = [victim(base, end_s, first_audio_ms, misses)]
                if kind != "none":
                    work.append(attacker(base, kind, end_s))
                results = await asyncio.gather(*work)
                async with http.get(base + "/health") as r:
                    lag = (await r.json())["event_loop_lag_ms"]
                rows.append((kind, first_audio_ms, len(misses), results[1] if len(results) > 1 else 0, lag))
                print(
                    f"phase {kind}: {len(first_audio_ms)} replies, first audio p50 "
                    f"{pct(first_audio_ms, 0.5):.0f} ms"
                )
            await reproductions(base)
            after = await leaks()
            async with http.get(base + "/metrics") as r:
                metrics = await r.text()
    finally:
        server.terminate()
        server.wait(30)
        log_file.close()
    print(f"machine: {machine()}")
    print(
        f"responder: {health['responder'].get('name')} weights={health['responder'].get('weights')} "
        f"device={health['responder'].get('device')}; phases of {args.phase_s:g} s; server log {log_path}"
    )
    print(
        "| attack | victim replies | first audio p50 / p95 (ms) | no audio in 60 s | attacker calls | "
        "server loop lag p99 / max (ms, last min) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, first, missed, calls, lag in rows:
        print(
            f"| {kind} | {len(first)} | {pct(first, 0.5):.0f} / {pct(first, 0.95):.0f} | {missed} | {calls} "
            "| "
            f"{lag['p99']:.0f} / {lag['max']:.0f} |"
        )
    print(
        "leaks (server, after warm-up -> after all phases and reproductions, calls hung up, 2 s settle): "
        + ", ".join(f"{k} {before[k]} -> {after[k]}" for k in before)
    )
    for name in (
        "glm4voice_events_dropped_total",
        "glm4voice_inbound_frames_dropped_total",
        "glm4voice_events_failed_total",
        "glm4voice_turn_errors_total",
    ):
        match = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
        print(f"{name} {match.group(1) if match else 'n/a'}")
    ended = re.findall(r'^glm4voice_calls_ended_total\{reason="([^"]+)"\} (\S+)$', metrics, re.MULTILINE)
    print(f"calls ended by the server: {dict(ended)}")
    print(json.dumps({"rows": [(k, f, m, c) for k, f, m, c, _ in rows], "before": before, "after": after}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-s", type=float, default=35.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process (internal)
    args = parser.parse_args()
    if args.serve:
        from server.logs import setup_logging

        setup_logging("INFO", "json")
        asyncio.run(_serve(args.serve))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

"""Load: N concurrent loopback calls talking to GLM-4-Voice (demo weights by default) for a while.

    .venv/bin/python bench/bench_load.py [--calls 20] [--seconds 120]

The server runs as its own process (`glm4voice serve`, the GLM engine on demo weights unless
GLM4VOICE_MODEL_WEIGHTS_DIR says otherwise); the aiortc clients run here. Each client speaks a short
synthesized sentence, waits for the whole reply (text done and audio played out), pauses 0.5-1.5 s and
speaks again, until the time is up. Reported: spoken turns, replies that arrived (completed, with
audio), replies missing, outbound audio underruns (server counter: a 20 ms frame sent short while a
reply was still arriving), turn latency (speech end to first reply frame, server-measured), the
server's event-loop lag (p99 over its last minute, and the whole-run histogram's p99 bucket), server
CPU and RSS. Prints the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_call_path import free_port, machine, pct, wait_healthy

from server.metrics import LoopLagProbe  # noqa: E402
from server.webrtc.rtc import set_host_addresses  # noqa: E402
from tests.helpers.rtc_client import RealtimeClient
from tests.helpers.speech import ENGLISH_SENTENCES, synth_speech


@dataclass
class Tally:
    turns: int = 0  # user turns the server committed
    no_turn: int = 0  # speech the server never turned into a turn
    replies: int = 0  # response.done completed and the reply's audio played out
    missing: int = 0  # committed turns whose reply did not (fully) arrive
    failed: int = 0  # response.done with another status
    latencies_ms: list[float] = field(default_factory=list)
    reply_audio_s: float = 0.0


async def talker(i: int, base: str, clip: np.ndarray, end_s: float, tally: Tally, clients: list) -> None:
    client = RealtimeClient(base)
    clients.append(client)
    await asyncio.sleep(i * 0.25)  # do not offer all at once
    await client.connect()
    rng = random.Random(i)
    await asyncio.sleep(rng.uniform(0, 2))
    while time.monotonic() < end_s:
        mark = len(client.events)
        client.mic.play(clip, 16_000)
        try:
            await client.wait_for("input_audio_buffer.committed", 20, after=mark)
        except TimeoutError:
            tally.no_turn += 1
            continue
        tally.turns += 1
        try:
            done = await client.wait_for("response.done", 90, after=mark)
            if done["response"]["status"] != "completed":
                tally.failed += 1
                continue
            started = await client.wait_for("output_audio_buffer.started", 30, after=mark)
            stopped = await client.wait_for("output_audio_buffer.stopped", 90, after=mark)
            tally.replies += 1
            tally.reply_audio_s += client.event_time(stopped) - client.event_time(started)
            latency = [e for e in client.events[mark:] if e["type"] == "glm4voice.turn.latency"]
            if latency and latency[0].get("speech_stopped_to_first_frame_ms") is not None:
                tally.latencies_ms.append(latency[0]["speech_stopped_to_first_frame_ms"])
        except TimeoutError:
            tally.missing += 1
        await asyncio.sleep(rng.uniform(0.5, 1.5))


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def histogram_quantile(text: str, name: str, q: float) -> str:
    """The upper bound of the bucket holding quantile q (Prometheus-style, coarse)."""
    buckets = [
        (m.group(1), float(m.group(2)))
        for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.MULTILINE)
    ]
    if not buckets or buckets[-1][1] == 0:
        return "n/a"
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return f"<= {float(bound) * 1000:g} ms" if bound != "+Inf" else "> last bucket"
    return "n/a"


async def run(args: argparse.Namespace) -> None:
    port = free_port()
    demo_dir = Path(tempfile.gettempdir()) / "glm4voice_bench_demo"
    env = {
        **os.environ,
        "GLM4VOICE_WEBRTC_HOST_ADDRESSES": "127.0.0.1",
        "GLM4VOICE_LIMITS_CALLS_PER_MINUTE_PER_ADDRESS": "0",
        "GLM4VOICE_LIMITS_MAX_CALLS": str(args.calls + 4),
        "GLM4VOICE_MODEL_DEMO_WEIGHTS_DIR": os.environ.get("GLM4VOICE_MODEL_DEMO_WEIGHTS_DIR", str(demo_dir)),
    }
    log_path = Path(tempfile.gettempdir()) / f"glm4voice_bench_load_{port}.log"
    log_file = open(log_path, "w")  # noqa: SIM115 - the server's whole life
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--log-format", "json"],
        cwd=ROOT,
        env=env,
        stderr=log_file,
    )
    base = f"http://127.0.0.1:{port}"
    set_host_addresses(("127.0.0.1",))
    clients: list[RealtimeClient] = []
    try:
        async with aiohttp.ClientSession() as http:
            health = await wait_healthy(http, base, server)
            speech = synth_speech(ENGLISH_SENTENCES[0], voice="en")
            clip = np.concatenate([speech, np.zeros(int(1.0 * 16_000), np.float32)])
            proc = psutil.Process(server.pid)
            proc.cpu_percent()
            tally = Tally()
            client_lag = LoopLagProbe(0.05, 100_000)  # the clients' own loop: are they keeping up?
            client_lag.start()
            t0 = time.monotonic()
            end_s = t0 + args.seconds
            await asyncio.gather(*(talker(i, base, clip, end_s, tally, clients) for i in range(args.calls)))
            wall_s = time.monotonic() - t0
            await client_lag.stop()
            cpu = proc.cpu_percent()
            rss_mb = proc.memory_info().rss / 2**20
            async with http.get(base + "/health") as r:
                health = await r.json()
            for client in clients:
                await client.hangup()
            await asyncio.sleep(1.0)
            async with http.get(base + "/metrics") as r:
                metrics = await r.text()
    finally:
        for client in clients:
            await client.close()
        server.terminate()
        server.wait(30)
        log_file.close()
    reasons: dict[str, int] = {}
    for line in log_path.read_text().splitlines():
        if line.startswith("{") and '"closing: ' in line:
            reason = json.loads(line)["msg"].removeprefix("closing: ")
            reasons[reason] = reasons.get(reason, 0) + 1
    lag = health["event_loop_lag_ms"]
    print(f"machine: {machine()}")
    print(
        f"responder: {health['responder'].get('name')} weights={health['responder'].get('weights')} "
        f"device={health['responder'].get('device')}"
    )
    print(
        f"{args.calls} concurrent calls talking for {args.seconds} s (wall {wall_s:.0f} s incl. last "
        "replies); "
        f"clip {speech.size / 16_000:.1f} s of speech + 1 s silence"
    )
    print(
        f"turns committed: {tally.turns}   replies arrived (completed + audio played out): {tally.replies}   "
        f"missing: {tally.missing}   failed: {tally.failed}   speech not turned into a turn: {tally.no_turn}"
    )
    print(
        f"reply audio played: {tally.reply_audio_s:.0f} s   outbound underruns (20 ms frames sent short): "
        f"{metric(metrics, 'glm4voice_outbound_underruns_total'):.0f}"
    )
    if tally.latencies_ms:
        print(
            f"turn latency (speech end -> first reply frame, ms): p50 {pct(tally.latencies_ms, 0.5):.0f}  "
            f"p90 {pct(tally.latencies_ms, 0.9):.0f}  max {max(tally.latencies_ms):.0f}"
        )
    print(
        f"event-loop lag (server, last minute): p50 {lag['p50']:.1f} ms  p99 {lag['p99']:.1f} ms  "
        f"max {lag['max']:.1f} ms;  whole run p99 "
        f"{histogram_quantile(metrics, 'glm4voice_event_loop_lag_seconds', 0.99)}"
    )
    print(
        f"client process event-loop lag: p50 {client_lag.quantile_s(0.5) * 1e3:.1f} ms  p99 "
        f"{client_lag.quantile_s(0.99) * 1e3:.1f} ms  max {client_lag.max_s * 1e3:.0f} ms (the {args.calls} "
        "aiortc "
        "clients share one process and the machine with the server)"
    )
    print(f"calls closed, by reason: {reasons} (server log {log_path})")
    print(
        f"server process: {cpu:.0f}% CPU average (100% = one core), RSS {rss_mb:.0f} MiB; clients in this "
        "process"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=120.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

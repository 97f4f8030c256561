"""Call-path figures with the echo responder (no model): signalling, turn-end to first audio, loop lag,
CPU and RSS per call, the VAD's cost and what the receive jitter buffer costs.

    .venv/bin/python bench/bench_call_path.py [--calls 10] [--turns 3]

The server runs as its own process (`glm4voice serve --responder echo`) so its CPU and RSS are its own;
the aiortc clients run here. Prints numbers with the machine named; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT))

from server.audio.vad import CHUNK_SAMPLES, SileroVad, VadState  # noqa: E402
from server.webrtc.rtc import set_host_addresses  # noqa: E402
from tests.helpers.rtc_client import RealtimeClient
from tests.helpers.speech import synth_speech

LAG_WINDOW = 200  # probes (x 50 ms = 10 s) behind /health's p99: one phase of this bench


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{model}, {os.cpu_count()} cores, {system}, Python {platform.python_version()}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def wait_healthy(
    http: aiohttp.ClientSession, base: str, server: subprocess.Popen, timeout_s: float = 300.0
) -> dict:
    """Poll a server subprocess's /health until it says ready (200); its JSON. Fails if the process exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, f"server exited (code {server.returncode})"
        try:
            async with http.get(base + "/health") as r:
                if r.status == 200:
                    return await r.json()
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("server not ready")
        await asyncio.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, jitter_frames: int) -> None:
        self.port = free_port()
        env = dict(
            os.environ,
            GLM4VOICE_WEBRTC_HOST_ADDRESSES="127.0.0.1",
            GLM4VOICE_LIMITS_MAX_CALLS="64",
            GLM4VOICE_WEBRTC_RECEIVE_JITTER_FRAMES=str(jitter_frames),
            GLM4VOICE_METRICS_LOOP_LAG_WINDOW=str(LAG_WINDOW),
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--responder",
                "echo",
                "--port",
                str(self.port),
                "--config",
                str(ROOT / "config.toml"),
                "--log-level",
                "WARNING",
            ],
            cwd=ROOT,
            env=env,
        )
        self.ps = psutil.Process(self.proc.pid)
        self.base_url = f"http://127.0.0.1:{self.port}"

    async def wait_ready(self) -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(self.base_url + "/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("server did not start")

    async def health(self) -> dict:
        async with aiohttp.ClientSession() as http:
            async with http.get(self.base_url + "/health") as r:
                return await r.json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def talk(client: RealtimeClient, clip: np.ndarray, turns: int) -> list[dict]:
    """Say `clip` `turns` times, each after the previous echo ended; return the latency events."""
    out = []
    for _ in range(turns):
        mark = len(client.events)
        client.mic.play(np.concatenate([clip, np.zeros(16_000, np.float32)]), 16_000)
        latency = await client.wait_for("glm4voice.turn.latency", 30, after=mark)
        await client.wait_for("output_audio_buffer.stopped", 30, after=mark)
        out.append(latency)
    return out


async def phase(server: ServerProcess, clip: np.ndarray, n_calls: int, turns: int) -> dict:
    rss_before = server.ps.memory_info().rss
    clients = [RealtimeClient(server.base_url) for _ in range(n_calls)]
    for client in clients:
        await client.connect()
    rss_connected = server.ps.memory_info().rss
    await asyncio.sleep(LAG_WINDOW * 0.05)  # refill the lag window with this phase's probes only
    cpu0, t0 = server.ps.cpu_times(), time.monotonic()
    results = await asyncio.gather(*(talk(c, clip, turns) for c in clients))
    cpu1, t1 = server.ps.cpu_times(), time.monotonic()
    health = await server.health()
    rss_talking = server.ps.memory_info().rss
    for client in clients:
        await client.hangup()
    cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    latencies = [e["speech_stopped_to_first_frame_ms"] for r in results for e in r]
    return {
        "offer_to_connected_ms": [c.offer_to_connected_ms for c in clients],
        "vad_end_to_first_frame_ms": latencies,
        "lag_p99_ms": health["event_loop_lag_ms"]["p99"],
        "lag_max_ms": health["event_loop_lag_ms"]["max"],
        "cpu_core_pct_per_call": 100.0 * cpu_s / (t1 - t0) / n_calls,
        "rss_per_call_mb": (max(rss_connected, rss_talking) - rss_before) / n_calls / 2**20,
        "rss_mb": rss_talking / 2**20,
    }


async def jitter_cost(clip: np.ndarray, turns: int) -> dict[int, float]:
    """Speech end (last mic sample sent) -> speech_stopped received, for each jitter-buffer setting."""
    out = {}
    for frames in (0, 4):
        server = ServerProcess(frames)
        try:
            await server.wait_ready()
            client = RealtimeClient(server.base_url)
            await client.connect()
            delays = []
            for _ in range(turns):
                mark = len(client.events)
                duration_s = client.mic.play(clip, 16_000)
                t_end = time.monotonic() + duration_s  # the mic plays in real time from now
                client.mic.play(np.zeros(16_000, np.float32), 16_000)
                stopped = await client.wait_for("input_audio_buffer.speech_stopped", 30, after=mark)
                delays.append((client.event_time(stopped) - t_end) * 1000)
                await client.wait_for("output_audio_buffer.stopped", 30, after=mark)
            await client.hangup()
            out[frames] = statistics.median(delays)
        finally:
            server.stop()
    return out


def vad_cost_ms() -> tuple[float, float]:
    """(wall ms, CPU ms) per chunk; CPU time is what the loop pays when the machine is shared."""
    vad, state = SileroVad(), VadState()
    x = (np.random.default_rng(0).standard_normal(CHUNK_SAMPLES) * 0.1).astype(np.float32)
    for _ in range(50):
        vad.probability(state, x)
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(500):
        vad.probability(state, x)
    return (time.perf_counter() - t0) / 500 * 1000, (time.thread_time() - c0) / 500 * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    set_host_addresses(("127.0.0.1",))  # our clients offer loopback candidates too
    clip = synth_speech("Hello, this is a short test.")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(f"bench_call_path.py @ {commit} on {machine()}")
    print(f"clip: {clip.size / 16_000:.2f} s of espeak-ng speech; responder: echo; server in its own process")
    wall_ms, cpu_ms = vad_cost_ms()
    print(f"silero-vad (onnxruntime, 1 thread): {wall_ms:.3f} ms wall, {cpu_ms:.3f} ms CPU per 32 ms chunk")
    server = ServerProcess(jitter_frames=0)
    try:
        await server.wait_ready()
        rows = {}
        for n in (1, args.calls):
            rows[n] = await phase(server, clip, n, args.turns)
    finally:
        server.stop()
    for n, r in rows.items():
        lat = r["vad_end_to_first_frame_ms"]
        print(f"\n{n} concurrent call(s), {args.turns} turns each:")
        print(
            f"  offer -> connected: median {statistics.median(r['offer_to_connected_ms']):.1f} ms "
            f"(max {max(r['offer_to_connected_ms']):.1f})"
        )
        print(
            f"  VAD end decision -> first outbound frame: p50 {pct(lat, 0.5):.1f} ms, p95 "
            f"{pct(lat, 0.95):.1f} ms "
            f"(n={len(lat)})"
        )
        print(f"  event-loop lag: p99 {r['lag_p99_ms']:.2f} ms, max {r['lag_max_ms']:.2f} ms (since start)")
        print(f"  server CPU per talking call: {r['cpu_core_pct_per_call']:.1f} % of one core")
        print(f"  server RSS: {r['rss_mb']:.0f} MB, +{r['rss_per_call_mb']:.2f} MB per call")
    costs = await jitter_cost(clip, args.turns)
    print(
        "\nreceive jitter buffer: speech end -> speech_stopped received (includes silence_duration_ms 500):"
    )
    for frames, ms in costs.items():
        print(f"  receive_jitter_frames={frames}: median {ms:.1f} ms")
    print(
        f"  releasing at once saves {costs[4] - costs[0]:.1f} ms per turn end (expected ~60: 3 frames x 20 "
        "ms)"
    )


if __name__ == "__main__":
    asyncio.run(main())

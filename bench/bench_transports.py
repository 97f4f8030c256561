"""WebSocket next to WebRTC, same server, same run: first reply audio after `speech_stopped` and server CPU
per call, for spoken turns.

    .venv/bin/python bench/bench_transports.py [--responder glm4voice] [--turns 6] [--calls 1]

The server runs as its own process (`glm4voice serve`, demo weights on CPU for glm4voice) so its CPU is its
own; the clients run here over loopback. Each turn says the same espeak-ng clip, then silence:

- WebRTC: an aiortc client (tests/helpers/rtc_client.py); first audio = the arrival of
  `output_audio_buffer.started` (sent as the first reply frame goes out on the track); also shown: the
  first received 20 ms frame louder than -60 dBFS (the echo replays its prefix padding first, which is
  quiet, so this one is later for echo; GLM-4-Voice's first frame is speech).
- WebSocket: `input_audio_buffer.append` of 24 kHz PCM in 100 ms pieces in real time; first audio = the
  first `response.output_audio.delta` after `speech_stopped`.

Both are timed on the client at arrival, from the arrival of `speech_stopped`. A WebRTC reply's audio
plays out in real time and the next turn waits for `output_audio_buffer.stopped`; a WebSocket reply
arrives as fast as it is generated and the next turn waits for its duration after `response.done`, so
both transports see the same turn rate. Server CPU per call: the server process's CPU seconds over the
phase's wall time, divided by the calls. Prints numbers and the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import soxr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_call_path import free_port, machine, pct  # noqa: E402
from server.audio.codecs import encode_wire  # noqa: E402
from server.webrtc.rtc import set_host_addresses  # noqa: E402
from tests.helpers.rtc_client import RealtimeClient  # noqa: E402
from tests.helpers.speech import synth_speech  # noqa: E402

CHUNK_S = 0.1
TAIL_S = 1.0  # silence after the clip: more than silence_duration_ms, the turn ends
LOUD_RMS = 1e-3  # -60 dBFS: a received frame with reply audio (the track sends digital silence between)


class ServerProcess:
    def __init__(self, responder: str) -> None:
        self.port = free_port()
        env = dict(
            os.environ,
            GLM4VOICE_WEBRTC_HOST_ADDRESSES="127.0.0.1",
            GLM4VOICE_LIMITS_MAX_CALLS="64",
            GLM4VOICE_WEBRTC_RECEIVE_JITTER_FRAMES="0",
        )
        cmd = [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--responder",
            responder,
            "--port",
            str(self.port),
            "--config",
            str(ROOT / "config.toml"),
            "--log-level",
            "WARNING",
        ]
        if responder == "glm4voice":
            cmd += ["--device", "cpu"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        self.ps = psutil.Process(self.proc.pid)
        self.base_url = f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                try:
                    async with http.get(self.base_url + "/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


async def rtc_call(base_url: str, clip: np.ndarray, turns: int) -> list[tuple[float, float | None]]:
    client = RealtimeClient(base_url)
    await client.connect()
    out = []
    try:
        for _ in range(turns):
            mark = len(client.events)
            client.mic.play(np.concatenate([clip, np.zeros(int(TAIL_S * 16_000), np.float32)]), 16_000)
            stopped = await client.wait_for("input_audio_buffer.speech_stopped", 60, after=mark)
            t0 = client.event_time(stopped)
            started = client.event_time(await client.wait_for("output_audio_buffer.started", 120, after=mark))
            await client.wait_for("output_audio_buffer.stopped", 120, after=mark)
            loud = next(
                (
                    t
                    for f, t in zip(client.heard, client.heard_times, strict=True)
                    if t >= t0 and float(np.sqrt(np.mean(f**2))) > LOUD_RMS
                ),
                None,
            )
            out.append(((started - t0) * 1000, None if loud is None else (loud - t0) * 1000))
    finally:
        await client.hangup()
    return out


class SocketClient:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[tuple[float, dict]] = []
        self._new = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            self.events.append((time.monotonic(), json.loads(message.data)))
            self._new.set()

    async def wait_for(self, kind: str, timeout_s: float, after: int) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            for t, event in self.events[after:]:
                if event["type"] == kind:
                    return t, event
            self._new.clear()
            await asyncio.wait_for(self._new.wait(), max(deadline - time.monotonic(), 0.001))

    async def stream(self, pcm16k: np.ndarray) -> None:
        pcm = soxr.resample(pcm16k, 16_000, 24_000)
        step = int(CHUNK_S * 24_000)
        start = time.monotonic()
        for i, offset in enumerate(range(0, pcm.size, step)):
            data = base64.b64encode(encode_wire(pcm[offset : offset + step], "audio/pcm")).decode("ascii")
            await self.ws.send_json({"type": "input_audio_buffer.append", "audio": data})
            await asyncio.sleep(max(start + (i + 1) * CHUNK_S - time.monotonic(), 0.0))

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()


async def ws_call(base_url: str, clip: np.ndarray, turns: int) -> list[tuple[float, float | None]]:
    out = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(
            base_url.replace("http", "ws", 1) + "/v1/realtime?model=bench", protocols=("realtime",)
        ) as ws:
            client = SocketClient(ws)
            await client.wait_for("session.created", 10, 0)
            for _ in range(turns):
                mark = len(client.events)
                await client.stream(np.concatenate([clip, np.zeros(int(TAIL_S * 16_000), np.float32)]))
                t0, _ = await client.wait_for("input_audio_buffer.speech_stopped", 60, mark)
                t1, _ = await client.wait_for("response.output_audio.delta", 120, mark)
                t_done, _ = await client.wait_for("response.done", 120, mark)
                out.append(((t1 - t0) * 1000, None))
                audio_s = sum(
                    len(base64.b64decode(e["delta"])) / 2 / 24_000
                    for _, e in client.events[mark:]
                    if e["type"] == "response.output_audio.delta"
                )
                await asyncio.sleep(max(t1 + audio_s - time.monotonic(), 0.0))  # the client "plays" it
            await client.close()
    return out


async def phase(server: ServerProcess, call, clip: np.ndarray, calls: int, turns: int) -> dict:
    cpu0, t0 = server.cpu_s(), time.monotonic()
    results = await asyncio.gather(*(call(server.base_url, clip, turns) for _ in range(calls)))
    cpu1, t1 = server.cpu_s(), time.monotonic()
    return {
        "first_audio_ms": [x for r in results for x, _ in r],
        "first_loud_ms": [y for r in results for _, y in r if y is not None],
        "cpu_core_pct_per_call": 100.0 * (cpu1 - cpu0) / (t1 - t0) / calls,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--responder", choices=["glm4voice", "echo"], default="glm4voice")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--calls", type=int, default=1)
    args = parser.parse_args()
    set_host_addresses(("127.0.0.1",))
    clip = synth_speech("Hello, this is a short test.")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(f"bench_transports.py @ {commit} on {machine()}")
    print(
        f"responder: {args.responder}{' (demo weights, CPU)' if args.responder == 'glm4voice' else ''}; "
        f"clip {clip.size / 16_000:.2f} s + {TAIL_S:.1f} s silence; {args.calls} call(s) x {args.turns} "
        "turns "
        "per transport; server in its own process, loopback"
    )
    server = ServerProcess(args.responder)
    rows = {}
    try:
        await server.wait_ready()
        await phase(server, ws_call, clip, 1, 1)  # warm-up turn (first-use costs), not counted
        for name, call in (("WebRTC", rtc_call), ("WebSocket", ws_call)):
            rows[name] = await phase(server, call, clip, args.calls, args.turns)
    finally:
        server.stop()
    print("\nspeech_stopped received -> first reply audio received (client clock):")
    for name, r in rows.items():
        lat = r["first_audio_ms"]
        print(
            f"  {name:9s}: p50 {pct(lat, 0.5):7.1f} ms, p95 {pct(lat, 0.95):7.1f} ms (n={len(lat)}); "
            f"server CPU per call {r['cpu_core_pct_per_call']:5.1f} % of one core"
        )
        if r["first_loud_ms"]:
            loud = r["first_loud_ms"]
            print(
                f"  {'':9s}  first frame > -60 dBFS: p50 {pct(loud, 0.5):7.1f} ms, p95 "
                f"{pct(loud, 0.95):7.1f} ms"
            )
    a, b = rows["WebSocket"], rows["WebRTC"]
    print(
        f"  WebSocket / WebRTC: p50 x{pct(a['first_audio_ms'], 0.5) / pct(b['first_audio_ms'], 0.5):.2f}, "
        f"CPU x{a['cpu_core_pct_per_call'] / b['cpu_core_pct_per_call']:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())

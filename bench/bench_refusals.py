"""What a refused request costs the server: its CPU per refusal under a flood of wrong keys.

    .venv/bin/python bench/bench_refusals.py [--seconds 8] [--root PATH]

Starts `glm4voice serve` (echo responder, an API key) from `--root` (default: this checkout; point it at
another checkout to compare two versions on one machine), then, from 127.0.0.7, sends control-connection
upgrades with a wrong key back to back for `--seconds`, twice: on one kept-alive connection, then on a
new connection each. Prints per mode the requests, the answers by status, the server's CPU seconds and
its CPU per request. After the first refusals the per-address rate answers `429`; past the penalty box's
threshold (where the checkout has one, docs/robustness.md) the address is refused at the TCP accept.
Prints the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_call_path import free_port, machine, wait_healthy  # noqa: E402

API_KEY = "bench-refusals-key-0123456789"
ATTACKER = "127.0.0.7"
UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


async def flood(base: str, seconds: float, new_connections: bool) -> tuple[int, Counter]:
    connector = aiohttp.TCPConnector(local_addr=(ATTACKER, 0), force_close=new_connections)
    answers: Counter = Counter()
    n, end = 0, time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=connector) as http:
        while time.monotonic() < end:
            n += 1
            headers = {**UPGRADE, "Authorization": f"Bearer wrong-{n}"}
            try:
                async with http.get(f"{base}/v1/realtime?call_id=rtc_{n:024x}", headers=headers) as r:
                    await r.read()
                    answers[r.status] += 1
            except aiohttp.ClientError as exc:
                answers[type(exc).__name__] += 1
    return n, answers


async def run(args: argparse.Namespace) -> None:
    root = Path(args.root).resolve()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(root), "GLM4VOICE_AUTH_API_KEY": API_KEY}
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--responder", "echo"],
        cwd=root,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as http:
            await wait_healthy(http, base, server)
        proc = psutil.Process(server.pid)
        print(f"machine: {machine()}")
        print(f"server: {root} (commit {_commit(root)}); {args.seconds:g} s per mode from {ATTACKER}")
        for mode, new in (("kept-alive connection", False), ("new connection each", True)):
            await asyncio.sleep(args.pause_s)  # blocks and rate buckets of the previous mode run out
            before = sum(proc.cpu_times()[:2])
            n, answers = await flood(base, args.seconds, new)
            cpu_s = sum(proc.cpu_times()[:2]) - before
            print(
                f"{mode}: {n} requests, answers {dict(answers)}, server CPU {cpu_s:.2f} s, "
                f"{1000 * cpu_s / n:.3f} ms per request"
            )
    finally:
        server.terminate()
        server.wait(30)


def _commit(root: Path) -> str:
    result = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return result.stdout.strip() or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--pause-s", type=float, default=0.0, help="wait before each mode")
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose server is measured")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

"""Graceful shutdown of a real `glm4voice serve` process: SIGTERM stops new calls, tells the clients,
lets a reply in progress finish within the grace period, closes the calls and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from server.logs import call_tag
from server.webrtc.rtc import set_host_addresses
from tests.helpers.rtc_client import RealtimeClient
from tests.helpers.speech import ENGLISH_SENTENCES, have_speech_tools, synth_speech

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 6.0
# make test installs espeak-ng and sox; their absence is a failure, not a skip.
assert have_speech_tools(), "espeak-ng and sox are needed (make test installs them)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_ready(base: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                async with http.get(base + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("server did not become ready")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_calls_and_exits_zero(sig):
    port = _free_port()
    env = {
        **os.environ,
        "GLM4VOICE_WEBRTC_HOST_ADDRESSES": "127.0.0.1",
        "GLM4VOICE_HTTP_SHUTDOWN_GRACE_S": str(GRACE_S),
        "GLM4VOICE_LIMITS_CALLS_PER_MINUTE_PER_ADDRESS": "0",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--responder",
            "echo",
            "--port",
            str(port),
            "--config",
            str(ROOT / "config.toml"),
            "--log-format",
            "json",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    set_host_addresses(("127.0.0.1",))  # this process's ICE agent (the clients') offers loopback too
    idle, talking = RealtimeClient(base), RealtimeClient(base)
    try:
        await _wait_ready(base, proc)
        await idle.connect()
        await talking.connect()
        speech = synth_speech(ENGLISH_SENTENCES[0], voice="en")
        talking.mic.play(np.concatenate([speech, np.zeros(19_200, np.float32)]), 16_000)
        started = await talking.wait_for("output_audio_buffer.started", 20)  # the echo reply is playing
        t_signal = time.monotonic()
        proc.send_signal(sig)
        for client in (idle, talking):
            notice = await client.wait_for("glm4voice.server.shutting_down", 5)
            assert notice["grace_s"] == GRACE_S
        closing = await idle.wait_for("glm4voice.call.closing", 3)  # nothing in progress: closed at once
        assert closing["reason"] == "server_shutdown"
        async with aiohttp.ClientSession() as http:  # no new calls while draining
            async with http.post(
                base + "/v1/realtime/calls", data="v=0\r\n", headers={"Content-Type": "application/sdp"}
            ) as r:
                body = await r.json()
                assert (r.status, body["error"]["code"]) == (503, "shutting_down") and r.headers[
                    "Retry-After"
                ]
            async with http.get(base + "/health") as r:
                assert r.status == 503 and (await r.json())["draining"] is True
        # The reply in progress plays to its end, then the call is closed - within the grace period.
        closing = await talking.wait_for("glm4voice.call.closing", GRACE_S + 2)
        assert closing["reason"] == "server_shutdown"
        stopped = talking.of_type("output_audio_buffer.stopped")
        assert stopped and stopped[0]["response_id"] == started["response_id"]
        assert talking.events.index(stopped[0]) < talking.events.index(closing)
        rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 15)
        took_s = time.monotonic() - t_signal
        assert rc == 0, proc.stderr.read()
        assert took_s < GRACE_S + 5
        lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert any("shutting down" in e["msg"] for e in lines) and any(e["msg"] == "shut down" for e in lines)
        closes = [e for e in lines if e["msg"].startswith("closing:")]
        assert {e["call_id"] for e in closes} == {
            call_tag(idle.call_id),
            call_tag(talking.call_id),
        }  # ids never logged
    finally:
        await idle.close()
        await talking.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

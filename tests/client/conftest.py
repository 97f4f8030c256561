"""Fixtures for the headless client's tests: a fake microphone the test speaks into, an echo path from the
client's speaker back into its microphone, and a GLM server that can be restarted on the same port."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr
from aiohttp import web

from client.audio_io import WIRE_RATE_HZ
from client.call import Call, CallOptions
from tests.helpers.rtc_client import RunningServer
from tests.helpers.speech import have_speech_tools

# make test installs espeak-ng and sox; their absence is a failure, not a skip.
assert have_speech_tools(), "espeak-ng and sox are needed (make test installs them)"


class ScriptedMic:
    """A fake microphone: speech the test queues, then silence. `drained` is set once it has all been sent."""

    finished = False  # a live microphone: the call runs until the test stops it

    def __init__(self) -> None:
        self._queue = np.zeros(0, np.float32)
        self.drained = asyncio.Event()

    def play(self, pcm: np.ndarray, sample_rate_hz: int) -> float:
        pcm48 = soxr.resample(pcm, sample_rate_hz, WIRE_RATE_HZ).astype(np.float32)
        self._queue = np.concatenate([self._queue, pcm48])
        self.drained.clear()
        return pcm48.size / WIRE_RATE_HZ

    def pull(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        take = min(n, self._queue.size)
        out[:take] = self._queue[:take]
        self._queue = self._queue[take:]
        if self._queue.size == 0:
            self.drained.set()
        return out

    def close(self) -> None:
        pass


class Speaker:
    """The client's speaker: keeps every received frame (48 kHz)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def push(self, pcm: np.ndarray) -> None:
        self.frames.append(pcm)

    def close(self) -> None:
        pass


class EchoPath:
    """A car cabin without echo cancellation: what the speaker plays reaches the microphone `gain_db` down,
    mixed into the next frames the microphone sends. Acts as both the call's source and its sink."""

    def __init__(self, mic: ScriptedMic, gain_db: float = -10.0) -> None:
        self.mic = mic
        self.speaker = Speaker()
        self._gain = 10 ** (gain_db / 20)
        self._echo = np.zeros(0, np.float32)

    finished = False

    def push(self, pcm: np.ndarray) -> None:
        self.speaker.push(pcm)
        self._echo = np.concatenate([self._echo, pcm])[-WIRE_RATE_HZ:]  # at most 1 s behind

    def pull(self, n: int) -> np.ndarray:
        echo = np.zeros(n, np.float32)
        take = min(n, self._echo.size)
        echo[:take] = self._echo[:take]
        self._echo = self._echo[take:]
        return self.mic.pull(n) + self._gain * echo

    def close(self) -> None:
        pass


@dataclass
class Recorder:
    """The call's emit callback: every event with its arrival time; `wait_for` without polling."""

    events: list[dict] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._new = asyncio.Event()

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        self.times.append(time.monotonic())
        self._new.set()

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, kind: str, timeout_s: float = 30.0, after: int = 0, **match) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events[after:]:
                if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no {kind} {match} within {timeout_s} s; saw {[e['type'] for e in self.events]}"
                )
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except TimeoutError:
                pass


def start_call(options: CallOptions, source, sink) -> tuple[Call, Recorder, asyncio.Task]:
    recorder = Recorder()
    call = Call(options, source, sink, recorder)
    return call, recorder, asyncio.get_running_loop().create_task(call.run())


async def serve_glm(demo_dir: Path, port: int = 0) -> RunningServer:
    """A GLM-4-Voice server on demo weights at 127.0.0.1:`port` (0: a free one), as tests/conftest.py's,
    but on a port of our choosing so that a restart comes back at the same address."""
    from pipeline.engine.config import EngineConfig
    from pipeline.engine.thread import GLMVoiceResponder
    from server.app import SERVER_KEY, create_app
    from server.config import load_config

    responder = GLMVoiceResponder(EngineConfig(demo_weights_dir=str(demo_dir), device="cpu"))
    config = load_config(
        None,
        env={},
        overrides={
            "webrtc": {"host_addresses": ["127.0.0.1"]},
            "responder": {"kind": "glm4voice"},
            "http": {"port": port},
            "limits": {"calls_per_minute_per_address": 0},
        },
    )
    runner = web.AppRunner(create_app(config, responder), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    running = RunningServer(f"http://127.0.0.1:{bound}", runner.app[SERVER_KEY], runner)
    await running.wait_ready()
    return running

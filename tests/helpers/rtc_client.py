"""An aiortc Realtime client for tests and benches: plays PCM into its microphone in real time and
records what it hears, with arrival times; `start_server()` runs a server in-process on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import av
import numpy as np
import soxr
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from pipeline.responder import Responder
from server.app import SERVER_KEY, Server, create_app
from server.config import load_config
from server.edge.connections import start_site
from server.webrtc.rtc import set_receive_jitter

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
RATE_48K = 48_000
FRAME = 960  # 20 ms at 48 kHz


async def make_offer(video_only: bool = False) -> str:
    """A real aiortc SDP offer (audio + the oai-events data channel, or video only) for signalling tests."""
    pc = RTCPeerConnection()
    pc.addTransceiver("video" if video_only else "audio")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


@dataclass
class RunningServer:
    base_url: str
    server: Server
    runner: web.AppRunner

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.server.ready():
            if self.server.start_error:
                raise RuntimeError(self.server.start_error)
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready")
            await asyncio.sleep(0.05)


async def start_server(
    responder: Responder | None = None, overrides: dict | None = None, kind: str = "echo"
) -> RunningServer:
    """Start a server on 127.0.0.1:<free port>, host candidates restricted to loopback."""
    merged = {
        "webrtc": {"host_addresses": ["127.0.0.1"]},
        "responder": {"kind": kind},
        "http": {"port": 0},
        "limits": {"calls_per_minute_per_address": 0},
    }  # tests open many calls from 127.0.0.1
    for section, values in (overrides or {}).items():
        merged.setdefault(section, {}).update(values)
    config = load_config(None, env={}, overrides=merged)
    app = create_app(config, responder)
    runner, site = await start_site(app, config, "127.0.0.1", 0)
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    running = RunningServer(f"http://127.0.0.1:{port}", app[SERVER_KEY], runner)
    await running.wait_ready()
    return running


@contextlib.asynccontextmanager
async def glm_server_with_key(
    demo_dir: Path, api_key: str, transcription: str | None = None
) -> AsyncIterator[RunningServer]:
    """The GLM engine on the demo weights behind an API key (the WebSocket clients' set-up);
    `transcription`: the `[transcription] enabled` value, None for the default."""
    from pipeline.engine.config import EngineConfig
    from pipeline.engine.thread import GLMVoiceResponder
    from pipeline.transcription.config import TranscriptionConfig

    extra = {} if transcription is None else {"transcription": TranscriptionConfig(enabled=transcription)}
    responder = GLMVoiceResponder(EngineConfig(demo_weights_dir=str(demo_dir), device="cpu"), **extra)
    running = await start_server(
        responder=responder, kind="glm4voice", overrides={"auth": {"api_key": api_key}}
    )
    try:
        yield running
    finally:
        await running.runner.cleanup()


class MicTrack(MediaStreamTrack):
    """A fake microphone: plays queued 48 kHz mono PCM in real time, silence otherwise."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue = np.zeros(0, np.float32)
        self._start: float | None = None
        self._index = 0
        self.play_started_s: float | None = None

    def play(self, pcm: np.ndarray, sample_rate_hz: int) -> float:
        """Queue speech; returns its duration in s."""
        pcm48 = (
            soxr.resample(pcm.astype(np.float32), sample_rate_hz, RATE_48K)
            if sample_rate_hz != RATE_48K
            else pcm
        )
        self._queue = np.concatenate([self._queue, pcm48.astype(np.float32)])
        return pcm48.size / RATE_48K

    @property
    def idle(self) -> bool:
        return self._queue.size == 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            self._index += 1
            due = self._start + self._index * FRAME / RATE_48K
            if due > now:
                await asyncio.sleep(due - now)
        chunk = np.zeros(FRAME, np.float32)
        take = min(FRAME, self._queue.size)
        chunk[:take] = self._queue[:take]
        self._queue = self._queue[take:]
        samples = (np.clip(chunk, -1, 1) * 32767).astype(np.int16).reshape(1, FRAME)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = RATE_48K
        frame.pts = self._index * FRAME
        frame.time_base = fractions.Fraction(1, RATE_48K)
        return frame


@dataclass
class RealtimeClient:
    """An aiortc client of /v1/realtime/calls. `heard` holds received 48 kHz mono audio, frame by frame."""

    base_url: str
    pc: RTCPeerConnection = field(default_factory=RTCPeerConnection)
    mic: MicTrack = field(default_factory=MicTrack)
    events: list[dict] = field(default_factory=list)
    event_times: list[float] = field(default_factory=list)
    heard: list[np.ndarray] = field(default_factory=list)  # (960,) float32 per frame
    heard_times: list[float] = field(default_factory=list)  # arrival time of each frame (monotonic s)
    call_id: str = ""
    location: str = ""
    offer_to_connected_ms: float = 0.0
    answer_sdp: str = ""
    headers: dict = field(default_factory=dict)  # e.g. Authorization for the call offer
    local_address: str = ""  # offers and hangups from this address (another 127.x.y.z: another client)
    # the offer asks for our `glm4voice.*` events (`?glm4voice_events=on`), as the tests read them; False:
    # a client that does not ask gets OpenAI's event types only
    glm4voice_events: bool = True

    def __post_init__(self) -> None:
        self._new_event = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def connect(
        self,
        as_json: bool = False,
        session: dict | None = None,
        as_form: bool = False,
        listen_only: bool = False,
    ) -> None:
        """`listen_only`: a recvonly audio section (no microphone; typed turns, spoken replies)."""
        if listen_only:
            self.pc.addTransceiver("audio", direction="recvonly")
        else:
            self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("oai-events")
        opened = asyncio.Event()
        self.channel.on("open", opened.set)
        self.channel.on("message", self._on_message)
        connected = asyncio.Event()

        @self.pc.on("connectionstatechange")
        def _state() -> None:
            if self.pc.connectionState == "connected":
                connected.set()

        @self.pc.on("track")
        def _track(track) -> None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._listen(track)))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        t0 = time.monotonic()
        query = {"glm4voice_events": "on"} if self.glm4voice_events else {}
        async with self._http() as http:
            if as_json:
                body = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
                if session is not None:
                    body["session"] = session
                async with http.post(
                    f"{self.base_url}/v1/realtime/calls", json=body, headers=self.headers, params=query
                ) as r:
                    assert r.status == 201, await r.text()
                    answer = (await r.json())["sdp"]
                    self.location = r.headers["Location"]
            elif as_form:  # the Realtime "unified interface": multipart fields sdp + session
                form = aiohttp.FormData(default_to_multipart=True)
                form.add_field("sdp", self.pc.localDescription.sdp)
                form.add_field("session", json.dumps(session or {}))
                async with http.post(
                    f"{self.base_url}/v1/realtime/calls", data=form, headers=self.headers, params=query
                ) as r:
                    assert r.status == 201, await r.text()
                    answer = await r.text()
                    self.location = r.headers["Location"]
            else:
                async with http.post(
                    f"{self.base_url}/v1/realtime/calls",
                    data=self.pc.localDescription.sdp,
                    headers={"Content-Type": "application/sdp", **self.headers},
                    params=query,
                ) as r:
                    assert r.status == 201, await r.text()
                    answer = await r.text()
                    self.location = r.headers["Location"]
        self.call_id = self.location.rsplit("/", 1)[-1]
        self.answer_sdp = answer
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        # Hear frames as they arrive (like a browser's adaptive buffer on a clean link), not 80 ms later,
        # so arrival times measure the server.
        set_receive_jitter(self.pc, 0, lambda _duration_s: True)  # the client polices nothing
        await asyncio.wait_for(connected.wait(), 15)
        self.offer_to_connected_ms = (time.monotonic() - t0) * 1000
        await asyncio.wait_for(opened.wait(), 15)

    def _on_message(self, message: str) -> None:
        self.events.append(json.loads(message))
        self.event_times.append(time.monotonic())
        self._new_event.set()

    async def _listen(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            data = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1) / 32768.0
            self.heard.append(data.astype(np.float32))
            self.heard_times.append(time.monotonic())

    def send(self, event: dict | str) -> None:
        self.channel.send(event if isinstance(event, str) else json.dumps(event))

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, kind: str, timeout_s: float = 20.0, after: int = 0) -> dict:
        """The first event of `kind` at index >= `after`."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events[after:]:
                if event["type"] == kind:
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [e["type"] for e in self.events]
                raise TimeoutError(f"no {kind} within {timeout_s} s; events: {seen}")
            self._new_event.clear()
            try:
                await asyncio.wait_for(self._new_event.wait(), remaining)
            except TimeoutError:
                pass

    def event_time(self, event: dict) -> float:
        return self.event_times[self.events.index(event)]

    def heard_pcm(self, since_s: float = 0.0) -> np.ndarray:
        frames = [f for f, t in zip(self.heard, self.heard_times, strict=True) if t >= since_s]
        return np.concatenate(frames) if frames else np.zeros(0, np.float32)

    def _http(self) -> aiohttp.ClientSession:
        local = aiohttp.TCPConnector(local_addr=(self.local_address, 0)) if self.local_address else None
        return aiohttp.ClientSession(connector=local)

    async def hangup(self) -> int:
        async with self._http() as http:
            async with http.post(f"{self.base_url}{self.location}/hangup") as r:
                status = r.status
        await self.close()
        return status

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()


def xcorr_peak(reference: np.ndarray, signal: np.ndarray) -> tuple[float, int]:
    """Normalised cross-correlation peak of `reference` inside `signal`, by FFT. -> (peak in [0, 1], lag)."""
    n = reference.size + signal.size - 1
    size = 1 << (n - 1).bit_length()
    ref = reference - reference.mean()
    sig = signal - signal.mean()
    corr = np.fft.irfft(np.fft.rfft(sig, size) * np.conj(np.fft.rfft(ref, size)), size)[: signal.size]
    # normalise by the energy of the reference and of the stretch of signal under it at each lag
    cumulative = np.concatenate([[0.0], np.cumsum(sig.astype(np.float64) ** 2)])
    ends = np.minimum(np.arange(corr.size) + ref.size, sig.size)
    window_energy = cumulative[ends] - cumulative[np.arange(corr.size)]
    denom = np.sqrt(np.sum(ref.astype(np.float64) ** 2) * np.maximum(window_energy, 1e-12))
    normalised = corr / denom
    lag = int(np.argmax(normalised))
    return float(normalised[lag]), lag

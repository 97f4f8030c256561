"""The engine with `lm_backend = "vllm"` against a scripted stand-in for vLLM (no vLLM process): what it
sends, that it sleeps while ids are on their way, and that a cancel closes the request at once."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.engine.config import EngineConfig, VLLMConfig
from pipeline.responder import AudioChunk, ReplyDone, SessionSettings, TextDelta

FIRST_IDS = 3  # text ids sent before the stand-in stalls
CLOSE_DEADLINE_S = 1.0


@dataclass
class StandIn:
    """Streams `FIRST_IDS` text ids, stalls until `release`, then `rest`; records bodies and disconnects."""

    url: str = ""
    first: list[int] = field(default_factory=list)
    rest: list[int] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    closed_at: list[float] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)


def _serve(stand_in: StandIn) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = json.dumps({"data": [{"id": "m", "max_model_len": 8192}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _chunk(self, payload: bytes) -> None:
            self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            self.wfile.flush()

        def _ids(self, ids: list[int]) -> None:
            for t in ids:
                data = {"choices": [{"index": 0, "text": "", "token_ids": [t], "finish_reason": None}]}
                self._chunk(b"data: " + json.dumps(data).encode() + b"\n\n")

        def do_POST(self) -> None:
            stand_in.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._ids(stand_in.first)
            stand_in.stalled.set()
            self.connection.settimeout(10)
            if not stand_in.release.is_set():
                threading.Thread(target=self._watch_close, daemon=True).start()
                stand_in.release.wait(10)
            if stand_in.closed_at:
                return
            self._ids(stand_in.rest)
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
            self.close_connection = True

        def _watch_close(self) -> None:
            try:
                if self.connection.recv(1) == b"":  # the client shut its socket: the request is aborted
                    stand_in.closed_at.append(time.monotonic())
                    stand_in.release.set()
            except OSError:
                pass

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stand_in.url = f"http://127.0.0.1:{server.server_address[1]}"
    return server


@pytest.fixture
async def engine(demo_dir: Path) -> AsyncIterator[tuple]:
    from pipeline.engine.thread import GLMVoiceResponder
    from pipeline.lm.text_tokenizer import GLMTokenizer

    stand_in = StandIn()
    server = _serve(stand_in)
    tok = GLMTokenizer.from_pretrained(demo_dir / "glm-4-voice-9b")
    text_ids = [i for i in range(tok.num_ranks) if tok.token_bytes(i).isalpha()]
    stand_in.first = text_ids[:FIRST_IDS]
    stand_in.rest = [tok.audio_offset + k for k in range(25)] + [tok.user_id]
    cfg = EngineConfig(demo_weights_dir=str(demo_dir), device="cpu", lm_backend="vllm")
    responder = GLMVoiceResponder(cfg, VLLMConfig(url=stand_in.url, probe_interval_s=60.0))
    await responder.start()
    await asyncio.to_thread(responder.health.probe)
    assert responder.info().ready and responder.engine.scheduler.m.lm is None  # the LM is not loaded here
    yield responder, stand_in, tok
    await responder.stop()
    server.shutdown()
    server.server_close()


async def _until(events, predicate, timeout_s: float = 10.0) -> list:
    got = []
    async with asyncio.timeout(timeout_s):
        async for event in events:
            got.append(event)
            if predicate(got):
                return got
    return got


async def test_reply_streams_and_the_engine_sleeps_while_ids_are_on_their_way(engine):
    responder, stand_in, tok = engine
    session = responder.open_session("c1", SessionSettings())
    session.add_text("Hello there.")
    turn = session.respond()
    events = turn.events()
    await _until(events, lambda got: sum(isinstance(e, TextDelta) for e in got) == FIRST_IDS)
    assert await asyncio.to_thread(stand_in.stalled.wait, 5)
    scheduler = responder.engine.scheduler
    steps = [0]
    step = scheduler.step

    def counted() -> None:
        steps[0] += 1
        step()

    scheduler.step = counted
    await asyncio.sleep(0.5)  # vLLM is silent: the engine thread should be blocked on its queue
    assert steps[0] <= 2, f"the engine stepped {steps[0]} times in 0.5 s while waiting for ids"
    stand_in.release.set()
    got = await _until(events, lambda got: isinstance(got[-1], ReplyDone), timeout_s=60)
    assert got[-1].reason == "stop"
    assert sum(e.pcm.size for e in got if isinstance(e, AudioChunk)) > 0
    d = session.dialogue
    body = stand_in.bodies[-1]
    reply = [*stand_in.first, *stand_in.rest[:-1]]  # the stop id is not kept
    assert body["prompt"] == d.history.ids()[: len(d.history.ids()) - len(reply)]  # the whole dialogue so far
    assert d.history.ids()[-len(reply) :] == reply
    assert body["stop_token_ids"] == sorted(tok.stop_ids) and body["stream"] and body["return_token_ids"]
    sampling = SessionSettings().sampling
    assert (body["temperature"], body["top_p"], body["top_k"]) == (
        sampling.temperature,
        sampling.top_p,
        sampling.top_k,
    )
    await session.close()


async def test_cancel_closes_the_request_at_once(engine):
    responder, stand_in, _ = engine
    session = responder.open_session("c2", SessionSettings())
    session.add_text("Hello there.")
    turn = session.respond()
    events = turn.events()
    await _until(events, lambda got: sum(isinstance(e, TextDelta) for e in got) == FIRST_IDS)
    assert await asyncio.to_thread(stand_in.stalled.wait, 5)
    cancelled_at = time.monotonic()
    turn.cancel(played_ms=0.0)
    got = await _until(events, lambda got: isinstance(got[-1], ReplyDone))
    assert got[-1].reason == "cancelled"
    assert await asyncio.to_thread(stand_in.release.wait, CLOSE_DEADLINE_S), "the request was not closed"
    assert stand_in.closed_at[0] - cancelled_at < CLOSE_DEADLINE_S
    await session.close()


async def test_not_ready_while_vllm_context_is_shorter_than_context_tokens(demo_dir: Path):
    from pipeline.engine.thread import GLMVoiceResponder

    stand_in = StandIn()
    server = _serve(stand_in)  # serves max_model_len 8192
    cfg = EngineConfig(demo_weights_dir=str(demo_dir), device="cpu", lm_backend="vllm", context_tokens=16384)
    responder = GLMVoiceResponder(cfg, VLLMConfig(url=stand_in.url, probe_interval_s=60.0))
    try:
        await responder.start()
        await asyncio.to_thread(responder.health.probe)
        info = responder.info()
        assert not info.ready
        assert (
            "max_model_len 8192" in info.details["error"] and "context_tokens 16384" in info.details["error"]
        )
    finally:
        await responder.stop()
        server.shutdown()
        server.server_close()

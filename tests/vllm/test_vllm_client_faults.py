"""The vLLM client's failure paths against a scripted stand-in server (no vLLM needed)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.lm.vllm_client import Sampling, VLLMClient, VLLMModelError, VLLMUnavailable
from tests.vllm.server import free_port

Script = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def fake() -> Iterator[Callable[[Script], VLLMClient]]:
    """A loopback HTTP server whose POST /v1/completions runs the test's script."""
    servers = []

    def make(script: Script) -> VLLMClient:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps({"data": [{"id": "m", "max_model_len": 4096}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                script(self)

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return VLLMClient(f"http://127.0.0.1:{server.server_address[1]}", read_timeout_s=5.0)

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def _sse(handler: BaseHTTPRequestHandler, chunks: list[dict], done: bool) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.end_headers()
    for chunk in chunks:
        handler.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        handler.wfile.flush()
    if done:
        handler.wfile.write(b"data: [DONE]\n\n")
    handler.close_connection = True


def _chunk(ids: list[int], finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": "", "token_ids": ids, "finish_reason": finish}]}


def test_stream_yields_ids_in_order_and_the_finish_reason(fake) -> None:
    client = fake(lambda h: _sse(h, [_chunk([5, 6]), _chunk([7]), _chunk([9], "stop")], done=True))
    stream = client.stream([1, 2, 3], Sampling(max_tokens=8, stop_ids=(9,)), "m")
    assert list(stream) == [5, 6, 7, 9]
    assert stream.end.finish_reason == "stop" and stream.end.error is None


def test_on_ready_wakes_for_every_batch_and_the_end(fake) -> None:
    client = fake(lambda h: _sse(h, [_chunk([5]), _chunk([6], "length")], done=True))
    woken = threading.Semaphore(0)
    stream = client.stream([1], Sampling(max_tokens=2), "m", on_ready=woken.release)
    got: list[int] = []
    while stream.end is None:
        assert woken.acquire(timeout=5)
        got += stream.drain()
    assert got == [5, 6] and stream.end.finish_reason == "length"


def test_stream_cut_mid_reply_is_unavailable(fake) -> None:
    client = fake(lambda h: _sse(h, [_chunk([5, 6])], done=False))
    stream = client.stream([1], Sampling(max_tokens=50), "m")
    with pytest.raises(VLLMUnavailable, match="ended before the reply"):
        list(stream)


def test_rejected_request_is_a_model_error(fake) -> None:
    def reject(h: BaseHTTPRequestHandler) -> None:
        body = json.dumps({"error": {"message": "prompt too long", "code": 400}}).encode()
        h.send_response(400)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    stream = fake(reject).stream([1], Sampling(max_tokens=5), "m")
    with pytest.raises(VLLMModelError, match="prompt too long"):
        list(stream)


def test_nobody_listening_is_unavailable() -> None:
    client = VLLMClient(f"http://127.0.0.1:{free_port()}", connect_timeout_s=2.0)
    with pytest.raises(VLLMUnavailable, match="unreachable"):
        client.probe(context_tokens=16)
    with pytest.raises(VLLMUnavailable, match="unreachable"):
        list(client.stream([1], Sampling(max_tokens=5), "m"))


def test_close_ends_a_silent_stream_at_once(fake) -> None:
    release = threading.Event()

    def stall(h: BaseHTTPRequestHandler) -> None:
        _sse(h, [_chunk([5])], done=False)
        release.wait(10)

    stream = fake(stall).stream([1], Sampling(max_tokens=50), "m")
    ids = iter(stream)
    assert next(ids) == 5
    stream.close()
    assert stream.join(1.0)
    assert list(ids) == [] and stream.end.finish_reason == "closed" and stream.end.error is None
    release.set()


def test_probe_checks_the_context_and_the_model_name(fake) -> None:
    client = fake(lambda h: None)
    assert client.probe(context_tokens=4096).name == "m"
    with pytest.raises(VLLMModelError, match="max_model_len 4096"):
        client.probe(context_tokens=8192)
    with pytest.raises(VLLMModelError, match="not model"):
        VLLMClient(client.url, model="other").probe(context_tokens=16)

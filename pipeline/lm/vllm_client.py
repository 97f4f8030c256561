"""GLM-4-Voice's LM served by vLLM: a torch-free streaming client of its OpenAI-compatible completions API.

The engine thread never waits on the network: `VLLMClient.stream()` starts one small reader thread per
reply that POSTs the whole dialogue's ids to `/v1/completions` (`stream`, `return_token_ids`), parses the
server-sent events and feeds the new ids into a queue; the engine takes what has arrived with
`TokenStream.drain()` and is woken by the `on_ready` callback (no polling). `close()` shuts the socket at
once, which is how vLLM learns to abort the request (barge-in, hang-up). Standard library only (http.client),
so the server side may import it.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "VLLMClient",
    "VLLMError",
    "VLLMUnavailable",
    "VLLMModelError",
    "ServedModel",
    "Sampling",
    "TokenStream",
]


class VLLMError(RuntimeError):
    """A reply could not be served by vLLM (the message says why, for the call's `error` event)."""


class VLLMUnavailable(VLLMError):
    """vLLM is unreachable, timed out, or its stream broke off (the server died or restarted)."""


class VLLMModelError(VLLMError):
    """vLLM answers but cannot serve this: wrong model name, too short a context, a rejected request."""


@dataclass(frozen=True)
class ServedModel:
    name: str  # the id vLLM serves it under (--served-model-name, else the --model path)
    max_model_len: int  # tokens: prompt + reply, vLLM's --max-model-len


@dataclass(frozen=True)
class Sampling:
    """One reply's settings. temperature 0 = greedy (vLLM caps it at 2, as the protocol does)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None  # per-request generator: the same seed and prompt give the same stream
    stop_ids: tuple[int, ...] = ()  # the stop id itself is the stream's last id


@dataclass(frozen=True)
class _End:
    finish_reason: str  # vLLM's: "stop" (a stop id), "length" (max_tokens), "abort"; "closed" after close()
    error: VLLMError | None = None


class VLLMClient:
    """One vLLM deployment: `url` like "http://127.0.0.1:8000" (path prefixes kept), optional bearer key."""

    def __init__(
        self,
        url: str,
        *,
        model: str = "",
        api_key: str = "",
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"vLLM url {url!r}: expected http(s)://host[:port][/prefix]")
        self.url, self.model, self.api_key = url.rstrip("/"), model, api_key
        self._https, self._host, self._prefix = parts.scheme == "https", parts.hostname, parts.path
        self._port = parts.port or (443 if self._https else 80)
        self.connect_timeout_s = (
            connect_timeout_s  # s: TCP connect and a short request (models, health, metrics)
        )
        self.read_timeout_s = (
            read_timeout_s  # s: the longest silence inside a reply's stream (prefill included)
        )

    # --- plain requests ----------------------------------------------------------------------------------
    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout_s, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _get(self, path: str) -> tuple[int, bytes]:
        conn = self._connection(self.connect_timeout_s)
        try:
            conn.request("GET", self._prefix + path, headers=self._headers())
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as err:
            raise VLLMUnavailable(f"vLLM at {self.url} unreachable ({type(err).__name__}: {err})") from err
        finally:
            conn.close()

    def served_model(self) -> ServedModel:
        """The model this client's requests go to: `model`, else the only one served."""
        status, body = self._get("/v1/models")
        if status != 200:
            raise VLLMModelError(f"vLLM at {self.url}: GET /v1/models answered {status}: {_error_text(body)}")
        served = [
            ServedModel(m["id"], int(m.get("max_model_len") or 0)) for m in json.loads(body).get("data", [])
        ]
        if self.model:
            match = [m for m in served if m.name == self.model]
            if not match:
                raise VLLMModelError(
                    f"vLLM at {self.url} serves {[m.name for m in served]}, not model "
                    f"{self.model!r} ([vllm] model)"
                )
            return match[0]
        if len(served) != 1:
            raise VLLMModelError(
                f"vLLM at {self.url} serves {[m.name for m in served]}: set [vllm] model to one"
            )
        return served[0]

    def probe(self, context_tokens: int) -> ServedModel:
        """Readiness: vLLM answers and serves a model whose max_model_len covers `context_tokens`."""
        model = self.served_model()
        if model.max_model_len < context_tokens:
            raise VLLMModelError(
                f"vLLM at {self.url} serves {model.name!r} with max_model_len {model.max_model_len}, "
                f"less than [model] context_tokens {context_tokens}: start vLLM with "
                f"--max-model-len {context_tokens} or lower context_tokens"
            )
        return model

    def metrics(self) -> dict[str, float]:
        """vLLM's Prometheus /metrics, each series summed over its labels (e.g. vllm:num_requests_running)."""
        status, body = self._get("/metrics")
        if status != 200:
            raise VLLMUnavailable(f"vLLM at {self.url}: GET /metrics answered {status}")
        totals: dict[str, float] = {}
        for line in body.decode("utf-8").splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                totals[name] = totals.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return totals

    # --- a reply's stream --------------------------------------------------------------------------------
    def stream(
        self,
        prompt_ids: Sequence[int],
        sampling: Sampling,
        model: str,
        on_ready: Callable[[], None] | None = None,
    ) -> TokenStream:
        """Start generating after `prompt_ids` (the whole dialogue) on its own reader thread.

        `model` is `served_model().name` (probed once, not per reply). `on_ready` is called from the reader
        thread after each batch of ids and once at the end (to wake the engine thread).
        """
        body = {
            "model": model,
            "prompt": list(prompt_ids),
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k or -1,
            "stop_token_ids": list(sampling.stop_ids),
            "stream": True,
            "return_token_ids": True,
            "detokenize": False,  # the engine decodes its own ids (text and speech interleaved)
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        stream = TokenStream(self, json.dumps(body).encode("utf-8"), on_ready)
        stream.start()
        return stream


class TokenStream:
    """One reply's ids as they arrive: `drain()` (never blocks) or iterate (blocks; tests and benches)."""

    def __init__(self, client: VLLMClient, body: bytes, on_ready: Callable[[], None] | None) -> None:
        self._client, self._body, self._on_ready = client, body, on_ready
        self._items: queue.SimpleQueue[list[int] | _End] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _conn/_closed between close() and the reader's connect
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = (
            None  # kept: http.client drops conn.sock once a response will close
        )
        self._closed = False
        self.end: _End | None = None  # set by drain()/iteration once the end item has been taken
        self._thread = threading.Thread(target=self._read, name="vllm-stream", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def finished(self) -> bool:
        return self.end is not None

    def drain(self) -> list[int]:
        """Every id that has arrived since the last call; afterwards `end` tells whether the stream ended."""
        out: list[int] = []
        while self.end is None:
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _End):
                self.end = item
            else:
                out.extend(item)
        return out

    def __iter__(self) -> Iterator[int]:
        """Blocking: ids until the end; raises the stream's error, if any."""
        while self.end is None:
            item = self._items.get(timeout=self._client.read_timeout_s + self._client.connect_timeout_s)
            if isinstance(item, _End):
                self.end = item
            else:
                yield from item
        if self.end.error is not None:
            raise self.end.error

    def close(self) -> None:
        """Abort now: the socket is shut, vLLM sees the client gone and frees the request's slot."""
        with self._lock:
            self._closed = True
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # --- the reader thread ---------------------------------------------------------------------------------
    def _put(self, item: list[int] | _End) -> None:
        self._items.put(item)
        if self._on_ready is not None:
            self._on_ready()

    def _read(self) -> None:
        try:
            end = self._request()
        except (OSError, http.client.HTTPException) as err:
            if self._closed:
                end = _End("closed")
            else:
                end = _End(
                    "error",
                    VLLMUnavailable(
                        f"vLLM at {self._client.url}: the stream broke off ({type(err).__name__}: {err})"
                    ),
                )
        except VLLMError as err:
            end = _End("error", err)
        finally:
            with self._lock:
                conn, self._conn, self._sock = self._conn, None, None
            if conn is not None:
                conn.close()
        self._put(end)

    def _request(self) -> _End:
        client = self._client
        conn = client._connection(client.connect_timeout_s)
        with self._lock:
            if self._closed:
                return _End("closed")
            self._conn = conn
        try:
            conn.connect()
        except OSError as err:
            raise VLLMUnavailable(f"vLLM at {client.url} unreachable ({type(err).__name__}: {err})") from err
        conn.sock.settimeout(client.read_timeout_s)
        with self._lock:  # close() between the lock above and connect() found no socket to shut
            self._sock = conn.sock
            if self._closed:
                return _End("closed")
        conn.request("POST", client._prefix + "/v1/completions", body=self._body, headers=client._headers())
        resp = conn.getresponse()
        try:
            if resp.status != 200:
                text = _error_text(resp.read())
                kind = VLLMUnavailable if resp.status >= 500 else VLLMModelError
                raise kind(f"vLLM at {client.url} refused the reply ({resp.status}): {text}")
            return self._events(resp)
        finally:
            resp.close()  # it owns the socket when the server said the connection will close

    def _events(self, resp: http.client.HTTPResponse) -> _End:
        """Server-sent events: `data: {chunk}` lines, then `data: [DONE]`."""
        finish = ""
        while True:
            line = resp.readline()
            if not line:
                if self._closed:
                    return _End("closed")
                raise VLLMUnavailable(f"vLLM at {self._client.url}: the stream ended before the reply did")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return _End(finish or "stop")
            chunk = json.loads(data)
            if "error" in chunk or chunk.get("object") == "error":
                raise VLLMModelError(f"vLLM at {self._client.url} failed the reply: {_error_text(data)}")
            for choice in chunk.get("choices", ()):
                ids = [int(t) for t in choice.get("token_ids") or ()]
                if ids:
                    self._put(ids)
                finish = choice.get("finish_reason") or finish


def _error_text(body: bytes) -> str:
    """vLLM's error message from a JSON error body (or the start of whatever it sent)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")
    err = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)

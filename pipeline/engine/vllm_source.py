"""A reply's tokens streamed from vLLM (`[model] lm_backend = "vllm"`): the remote `TokenSource`.

Each reply is one streaming request with the whole dialogue's ids (vLLM's prefix cache carries the
turns, so nothing is kept here between replies); ids arrive on the request's reader thread, which wakes
the engine through `wake` (no polling), and `next_ids` hands them out one per step, so decoder
scheduling, barge-in and history work exactly as with the local LM. Barge-in, hang-up and the end of a
reply close the stream: vLLM aborts the request at once. `VLLMHealth` probes the deployment on its own
thread: the responder is not ready until vLLM serves a model whose max_model_len covers context_tokens,
flips to not ready when a stream breaks, and recovers by itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.engine.config import EngineConfig, VLLMConfig
from pipeline.engine.dialogue import Dialogue
from pipeline.lm.vllm_client import Sampling, ServedModel, TokenStream, VLLMClient, VLLMError, VLLMUnavailable

log = logging.getLogger(__name__)


@dataclass
class RemoteJob:
    """One reply's request: the prompt sent, the stream, ids that arrived and were not handed out yet."""

    ids: list[int]
    stream: TokenStream | None = None  # started by the first `advance`
    arrived: list[int] = field(default_factory=list)
    ids_in: bool = False  # the first id came: vLLM has the prompt in (time "prefill_done")


class VLLMHealth:
    """Readiness of the vLLM deployment, probed every `probe_interval_s` on its own thread."""

    def __init__(self, client: VLLMClient, context_tokens: int, probe_interval_s: float) -> None:
        self.client, self.context_tokens, self.interval_s = client, context_tokens, probe_interval_s
        self.model: ServedModel | None = None  # set while ready
        self.reason: str | None = "vLLM not probed yet"  # why it is not ready (None = ready)
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="vllm-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    @property
    def ready(self) -> bool:
        return self.reason is None

    def report(self, error: VLLMUnavailable) -> None:
        """A stream broke: not ready now; probe again at once."""
        self.reason = str(error)
        self._wake.set()

    def probe(self) -> None:
        try:
            self.model = self.client.probe(self.context_tokens)
        except VLLMError as err:
            if self.reason is None:
                log.error("vLLM not ready: %s", err)
            self.reason = str(err)
            return
        if self.reason is not None:
            log.info("vLLM ready: %s, max_model_len %d", self.model.name, self.model.max_model_len)
        self.reason = None

    def _run(self) -> None:
        while not self._stopped:
            self.probe()
            self._wake.wait(self.interval_s)  # a periodic probe of another service, not a hand-off
            self._wake.clear()


class VLLMSource:
    """The `TokenSource` backed by a vLLM deployment; the local LM is not loaded."""

    def __init__(
        self,
        cfg: EngineConfig,
        vllm: VLLMConfig,
        health: VLLMHealth,
        stop_ids: Sequence[int],
        wake: Callable[[], None],
    ) -> None:
        self.client = VLLMClient(
            vllm.url,
            model=vllm.model,
            api_key=vllm.api_key,
            connect_timeout_s=vllm.connect_timeout_s,
            read_timeout_s=vllm.read_timeout_s,
        )
        self.cfg, self.health, self.stop_ids, self.wake = cfg, health, tuple(stop_ids), wake
        self.counters = {"vllm_requests": 0, "vllm_ids": 0, "vllm_closed_early": 0, "vllm_failed": 0}

    @property
    def max_context_tokens(self) -> int:
        model = self.health.model
        return model.max_model_len if model is not None else self.cfg.context_tokens

    def open(self, d: Dialogue) -> None:
        pass  # vLLM's prefix cache holds the call's context; nothing to allocate here

    def close(self, d: Dialogue) -> None:
        self.rewind(d)

    def begin(self, d: Dialogue, ids: list[int], *, for_reply: bool) -> None:
        if not for_reply:
            return  # no early prefill: the reply's request brings the whole prompt
        if not self.health.ready:
            raise VLLMUnavailable(f"the LM server is not ready: {self.health.reason}")
        d.prompt_job = RemoteJob(ids)

    def prefilling(self, d: Dialogue) -> bool:
        job = d.prompt_job
        return job is not None and not job.ids_in

    def waiting(self, d: Dialogue) -> bool:
        """The call's next id is on its way from vLLM: the engine may sleep until `wake`."""
        job = d.prompt_job
        if job is None or job.stream is None:
            return False
        job.arrived.extend(job.stream.drain())
        return not job.arrived and not job.stream.finished

    def advance(self, d: Dialogue) -> bool:
        """Start the request on the first call; the prompt counts as in once the first id arrived."""
        job, reply = d.prompt_job, d.reply
        if job.stream is None:
            s = reply.sampling
            room = self.max_context_tokens - len(job.ids)
            sampling = Sampling(
                max_tokens=max(1, min(reply.max_new_tokens, room)),
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                stop_ids=self.stop_ids,
            )
            job.stream = self.client.stream(job.ids, sampling, self.health.model.name, on_ready=self.wake)
            self.counters["vllm_requests"] += 1
        if self.waiting(d):
            return False
        job.ids_in = True
        d.turn_prefilled_tokens.append(len(job.ids))  # what we sent; vLLM's /metrics say what it computed
        return True

    def next_ids(self, dialogues: Sequence[Dialogue]) -> list[int]:
        """One arrived id per reply (the scheduler asks only for replies that are not `waiting`)."""
        jobs = [d.prompt_job for d in dialogues]
        for job in jobs:  # raise before taking any id: the scheduler retries the others one by one
            job.arrived.extend(job.stream.drain())
            if not job.arrived:
                self._ended_early(job.stream)
        self.counters["vllm_ids"] += len(jobs)
        return [job.arrived.pop(0) for job in jobs]

    def _ended_early(self, stream: TokenStream) -> None:
        """The stream ended before the reply did (the stop id and max_tokens end it on our side first)."""
        self.counters["vllm_failed"] += 1
        error = stream.end.error if stream.end is not None else None
        if isinstance(error, VLLMUnavailable):
            self.health.report(error)
        raise error or VLLMUnavailable(f"the LM server ended the reply early ({stream.end.finish_reason})")

    def rewind(self, d: Dialogue) -> None:
        """The reply is over (done, barge-in, failed, hang-up): close its request now."""
        job, d.prompt_job = d.prompt_job, None
        if job is not None and job.stream is not None and not job.stream.finished:
            job.stream.close()
            self.counters["vllm_closed_early"] += 1

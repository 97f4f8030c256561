"""Where a reply's tokens come from: the `TokenSource` seam, and its local implementation.

The scheduler asks a token source three things: make a call's context hold a prompt (`begin`, then `advance` a
bounded piece per step), give the next id of every generating reply (`next_ids`, one batched step), and follow
the history when it changes behind the context (`rewind`: a reply kept only what the user heard, a trimmed or
failed reply). Everything else (the history, decoder scheduling, barge-in) is the scheduler's and does not
depend on the source. Today's one source, `LocalLM`, runs the shared `VoiceLM` in the engine thread: chunked
prefill into the call's KV slot, one batched decode step for all rows, one batched sample, one host sync per
step. A remote source (pipeline/engine/vllm_source.py: vLLM over HTTP) starts a streaming request in
`begin`/`advance` and hands out the ids that arrived in `next_ids`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import torch

from pipeline.engine.dialogue import Dialogue, PromptJob
from pipeline.lm.kv_cache import common_prefix_len
from pipeline.lm.model import VoiceLM
from pipeline.lm.sampling import RowSampling, sample_rows


class TokenSource(Protocol):
    counters: dict[str, int]  # reported in the responder's details (health)

    def open(self, d: Dialogue) -> None:
        """A new call: allocate its context."""

    def close(self, d: Dialogue) -> None:
        """Hangup: free the call's context."""

    def begin(self, d: Dialogue, ids: list[int], *, for_reply: bool) -> None:
        """The call's context is to hold `ids` (the history + new user block(s)). `for_reply`: generation
        follows; else it is an early prefill of speech still being spoken. The work is done by `advance`."""

    @property
    def max_context_tokens(self) -> int:
        """Prompt + reply tokens the LM can hold."""

    def prefilling(self, d: Dialogue) -> bool:
        """Prompt work of the call is left (`advance` has something to do)."""

    def waiting(self, d: Dialogue) -> bool:
        """The call's next piece (its first id, its next id) is computed elsewhere and not here yet: the
        engine may sleep; the source wakes it when it arrives. Always False for a local LM."""

    def advance(self, d: Dialogue) -> bool:
        """A bounded piece of the call's prompt work; True once the prompt is in (ids can come)."""

    def next_ids(self, dialogues: Sequence[Dialogue]) -> list[int]:
        """One new id for each generating reply (its prompt is in and its last id was accepted)."""

    def rewind(self, d: Dialogue) -> None:
        """The history changed behind the context: keep only their common prefix; prompt work is dropped."""


class LocalLM:
    """The shared VoiceLM on this machine: chunked prefill and one batched decode step per engine step."""

    def __init__(self, lm: VoiceLM, prefill_chunk_tokens: int) -> None:
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        self.lm = lm
        self.chunk_tokens = prefill_chunk_tokens
        self.counters = {"prefilled_tokens": 0, "prefill_chunks": 0, "decode_steps": 0, "decoded_rows": 0}

    @property
    def max_context_tokens(self) -> int:
        return self.lm.max_context_tokens

    def open(self, d: Dialogue) -> None:
        d.cache = self.lm.new_cache()

    def close(self, d: Dialogue) -> None:
        d.prompt_job = None
        if d.cache is not None:
            d.cache.release()
            d.cache = None

    def begin(self, d: Dialogue, ids: list[int], *, for_reply: bool) -> None:
        keep = common_prefix_len(d.cache.token_ids, ids)
        if for_reply and keep == len(ids):  # all cached: the last position is computed again for its logits
            keep -= 1
        if keep < d.cache.length:
            d.cache.truncate(keep)
        d.prompt_job = PromptJob(ids, for_reply)
        if for_reply:
            d.reply.gen.generator = torch.Generator(device=self.lm.device)
            d.reply.gen.generator.manual_seed(time.monotonic_ns() & 0x7FFFFFFF)

    def prefilling(self, d: Dialogue) -> bool:
        job = d.prompt_job
        return job is not None and (d.cache.length < len(job.ids) or (job.for_reply and job.logits is None))

    def waiting(self, d: Dialogue) -> bool:
        return False

    def advance(self, d: Dialogue) -> bool:
        job, cache = d.prompt_job, d.cache
        chunk = job.ids[cache.length : cache.length + self.chunk_tokens]
        if chunk:
            logits = self.lm.prefill(cache, chunk)  # (V,)
            job.prefilled += len(chunk)
            self.counters["prefilled_tokens"] += len(chunk)
            self.counters["prefill_chunks"] += 1
            if cache.length == len(job.ids) and job.for_reply:
                job.logits = logits
        if cache.length < len(job.ids):
            return False
        if job.for_reply:
            d.turn_prefilled_tokens.append(job.prefilled)
        else:
            d.prompt_job = None
        return True

    def next_ids(self, dialogues: Sequence[Dialogue]) -> list[int]:
        fed = [d for d in dialogues if d.reply.gen.next_id is not None]  # feed their last id: one decode step
        fresh = [d for d in dialogues if d.reply.gen.next_id is None]  # prompt just in: its logits are ready
        parts = []
        if fed:
            parts.append(
                self.lm.decode_step([d.cache for d in fed], [d.reply.gen.next_id for d in fed])
            )  # (B1, V)
            self.counters["decode_steps"] += 1
            self.counters["decoded_rows"] += len(fed)
        if fresh:
            parts.append(torch.stack([d.prompt_job.logits for d in fresh]))  # (B2, V)
        rows = fed + fresh
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]  # (B, V)
        settings = [
            RowSampling(s.temperature, s.top_p, s.top_k, d.reply.gen.generator)
            for d, s in ((d, d.reply.sampling) for d in rows)
        ]
        ids = sample_rows(logits, settings).tolist()  # the step's one device -> host transfer
        for d in fresh:
            d.prompt_job = None
        by_row = {id(d): token for d, token in zip(rows, ids, strict=True)}
        return [by_row[id(d)] for d in dialogues]

    def rewind(self, d: Dialogue) -> None:
        d.prompt_job = None
        if d.cache is not None:
            d.cache.truncate(common_prefix_len(d.cache.token_ids, d.history.ids()))

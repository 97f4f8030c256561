"""One assistant reply in progress (one `Reply`), grouped by concern: what was asked, when each stage
happened, what the LM produced, and the speech on its way to PCM. Touched only by the engine's LM thread,
except `cancel_event` and `played_ms`, which the asyncio side sets (in that order) on a barge-in, and
`audio.stream`, the decoder worker's. `cancel_event` also means "no more output": the LM thread sets it
when it ends a reply early (hangup, failure, shutdown), the worker and the delivery then drop its audio.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.audio_format import DECODER_RATE_HZ
from pipeline.responder import ReplyEvent, SamplingSettings

if TYPE_CHECKING:  # keep the asyncio side's imports free of torch
    import torch

    from pipeline.decoder.stream import DecoderStream
    from pipeline.lm.history import Segment
    from pipeline.lm.prompt import StreamParser


@dataclass
class InputItem:
    """One pending conversation item, already as its prompt block: a user turn (`user_block_ids`) or a
    text message of another role (`message_block_ids`)."""

    block_ids: list[int]
    speech_input: bool | None  # a user item: speech tokens (True) or typed text (False); None: another role
    text: str | None = None  # the typed text, if any
    key: int | None = None  # the session's index of this item (`ResponderSession.delete_item`)


@dataclass
class Timeline:
    """When each stage happened (monotonic s), each recorded once."""

    tokens_ready_t: float | None = None  # the user's speech tokens were final (commit); None for typed input
    started_t: float = field(default_factory=time.monotonic)  # respond() was called
    stages: dict[str, float] = field(default_factory=dict)  # prefill_done, first_text_token, ..., first_pcm

    def mark(self, stage: str) -> float:
        """Record a stage once; returns its time."""
        if stage not in self.stages:
            self.stages[stage] = time.monotonic()
        return self.stages[stage]

    @property
    def first_pcm_t(self) -> float | None:
        return self.stages.get("first_pcm")


@dataclass
class Generation:
    """What the LM produced for this reply (the token source fills it one id per step)."""

    prompt_ids: list[int] = field(default_factory=list)  # history + this reply's input + header; set at start
    segments: list[Segment] = field(default_factory=list)  # what the start added to the history (to undo it)
    reply_segment: Segment | None = None  # the reply in the history: header + the kept ids
    prompt_done: bool = False  # the whole prompt is in the LM's context: ids can come
    generated_ids: list[int] = field(default_factory=list)  # sampled ids, stop token excluded
    next_id: int | None = None  # sampled, not yet fed back to the LM (the next step feeds it)
    finish_reason: str | None = None  # "stop" | "length" once generation ended (audio may be pending)
    kept_ids: int = 0  # generated ids the history kept when the reply ended
    parser: StreamParser | None = None
    generator: torch.Generator | None = None  # this reply's sampling noise


@dataclass
class AudioOut:
    """Speech values on their way to PCM. The LM thread owns every field but `stream`, which the decoder
    worker makes on the reply's first block and alone uses (pipeline/engine/decoder_worker.py)."""

    stream: DecoderStream | None = None
    buffer: list[int] = field(default_factory=list)  # speech values waiting for the next block
    next_block_tokens: int = 0  # speech values the stream wants for its next block (set at the start)
    in_flight: bool = False  # a block of this reply is with the decoder worker (one at a time: in order)
    finished: bool = False  # the block with the stream's tail went to the worker
    tokens_decoded: int = 0  # speech values handed to the worker
    samples: int = 0  # PCM samples the worker emitted (counted when its report arrives)
    sample_rate_hz: int = DECODER_RATE_HZ

    def produced_ms(self) -> float:
        return 1000.0 * self.samples / self.sample_rate_hz


@dataclass
class ReplyState:
    reply_id: str
    emit: Callable[[ReplyEvent], None]  # thread-safe delivery into the call's asyncio queue
    sampling: SamplingSettings
    max_new_tokens: int
    instructions: str | None = None  # this reply's, in place of the session's (None: the session's)
    items: list[InputItem] = field(default_factory=list)  # the pending input this reply answers (may be none)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    played_ms: float | None = None  # written by the asyncio side before it sets cancel_event
    time: Timeline = field(default_factory=Timeline)
    gen: Generation = field(default_factory=Generation)
    audio: AudioOut = field(default_factory=AudioOut)

    @property
    def started(self) -> bool:
        return bool(self.gen.prompt_ids)

    @property
    def generating(self) -> bool:
        """The prompt is in and generation has not ended: the next step wants an id for this reply."""
        return self.gen.prompt_done and self.gen.finish_reason is None

    def lead_ms(self, now: float) -> float:
        """Audio produced minus wall time since the first PCM: how far the stream is ahead of playback."""
        first = self.time.first_pcm_t
        if first is None:
            return -1e9  # no audio yet: the most urgent kind of turn
        return self.audio.produced_ms() - 1000.0 * (now - first)

    def mark(self, stage: str) -> float:
        return self.time.mark(stage)

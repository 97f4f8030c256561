"""One call's conversation as the engine thread sees it: history as token ids, the KV cache that
holds it, the pending user input, and the reply in progress.

Everything here is touched only by the engine thread (the call's session object on the asyncio
side just sends commands). The history is a `pipeline.lm.prompt.DialogueHistory` (system block + whole
turns as ids). Invariant between turns: `cache.token_ids` is a prefix of `history.ids()`; a tail that
is in the history but not in the cache (a token sampled but never fed back) is prefilled with the
next turn. The next turn's prompt is the history plus the new user block; only what differs from the
cache is prefilled (the longest common prefix is kept), so turn 2 prefills only its new tokens and an
early prefill of the user's first 4 s blocks is reused when those tokens stand.

Barge-in keeps what the user heard: `played_ms / 80 ms` speech tokens (one speech token = 80 ms,
DESIGN.md frame contract) and the text tokens generated before the last heard one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.lm.kv_cache import common_prefix_len
from pipeline.lm.prompt import DialogueHistory
from pipeline.responder import SamplingSettings, SessionSettings, TurnEvent

SPEECH_TOKEN_MS = 80.0  # 12.5 speech tokens/s (tokenizer pooling 4 x 20 ms frames)


@dataclass
class UserItem:
    """One pending user message: speech tokens (tokenizer values) or typed text."""

    audio_tokens: list[int] | None = None
    text: str | None = None


def heard_prefix_len(generated_ids: list[int], is_audio: Callable[[int], bool], played_ms: float) -> int:
    """How many generated ids the user heard: up to and including the last heard speech token.

    Text before the last heard speech token was shown with the audio around it; text after it (and
    every later speech token) was never heard, so it leaves the history.
    """
    heard_speech = int(max(played_ms, 0.0) // SPEECH_TOKEN_MS)
    if heard_speech == 0:
        return 0
    seen = 0
    for index, token_id in enumerate(generated_ids):
        if is_audio(token_id):
            seen += 1
            if seen == heard_speech:
                return index + 1
    return len(generated_ids)  # heard at least everything that was decoded


@dataclass
class Reply:
    """The assistant reply in progress (one `Turn`)."""

    turn_id: str
    emit: Callable[[TurnEvent], None]  # thread-safe delivery into the call's asyncio queue
    sampling: SamplingSettings
    max_new_tokens: int
    items: list[UserItem]
    tokens_ready_t: float | None = None  # when the user's speech tokens were final (monotonic s)
    started_t: float = field(default_factory=time.monotonic)
    prompt_ids: list[int] = field(default_factory=list)  # history + this turn's user block
    turns_before: int = 0  # history turns before this reply's user block(s) (to undo a failed reply)
    kept_ids: int = 0  # generated ids the history kept when the reply ended
    generated_ids: list[int] = field(default_factory=list)  # sampled ids, stop token excluded
    next_id: int | None = None  # sampled, not yet fed to the LM
    speech_buffer: list[int] = field(default_factory=list)  # speech values waiting for the decoder
    speech_tokens_decoded: int = 0
    text_parts: list[str] = field(default_factory=list)
    audio_samples: int = 0  # produced and handed to the server
    sample_rate_hz: int = 22050
    first_pcm_t: float | None = None
    stage_times: dict[str, float] = field(default_factory=dict)
    finish_reason: str | None = None  # "stop" | "length" once generation ended (audio may be pending)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    played_ms: float | None = None
    decoder_stream: object | None = None  # pipeline.decoder.model.DecoderStream
    parser: object | None = None  # pipeline.lm.prompt.StreamParser
    generator: object | None = None  # torch.Generator for this call's sampling

    @property
    def started(self) -> bool:
        return bool(self.prompt_ids)

    @property
    def generating(self) -> bool:
        return self.started and self.finish_reason is None and self.next_id is not None

    def lead_ms(self, now: float) -> float:
        """Audio produced minus wall time since the first PCM: how far the stream is ahead of playback."""
        if self.first_pcm_t is None:
            return -1e9  # no audio yet: the most urgent kind of turn
        produced_ms = 1000.0 * self.audio_samples / self.sample_rate_hz
        return produced_ms - 1000.0 * (now - self.first_pcm_t)

    def mark(self, stage: str) -> float:
        """Record a timeline point once; returns its time."""
        if stage not in self.stage_times:
            self.stage_times[stage] = time.monotonic()
        return self.stage_times[stage]


@dataclass
class Dialogue:
    """Per-call state, owned by the engine thread."""

    call_id: str
    settings: SessionSettings
    cache: object | None  # pipeline.lm.model.LMCache; None once the call is closed
    tokenizer_stream: object | None  # pipeline.tokenizer.tokenizer.TokenizerStream
    history: DialogueHistory | None = None  # set when the engine opens the call
    pending_items: list[UserItem] = field(default_factory=list)
    partial_audio_tokens: list[int] = field(default_factory=list)  # final tokens of the open user speech
    audio_pushed: bool = False
    early_prefill_wanted: bool = False  # final speech tokens arrived that the cache does not hold yet
    tokens_ready_t: float | None = None
    reply: Reply | None = None
    last_reply: Reply | None = None  # the newest ended reply (a barge-in may still trim it)
    turns_done: int = 0
    prefilled_tokens: int = 0  # total ids this call has prefilled (turn 2 prefills only its new ones)
    turn_prefilled_tokens: list[int] = field(default_factory=list)  # per reply: ids its start prefilled
    turn_prompt_lengths: list[int] = field(default_factory=list)  # per reply: history + user block, ids
    closed: bool = False

    def reset(self) -> None:
        """Forget the conversation (the cache is emptied, not freed)."""
        self.history.reset()
        self.pending_items.clear()
        self.partial_audio_tokens.clear()
        self.audio_pushed = False
        self.reply = None
        if self.cache is not None:
            self.cache.reset()
        if self.tokenizer_stream is not None:
            self.tokenizer_stream.reset()

    def release(self) -> None:
        """Hangup: free the KV cache and the streams."""
        self.closed = True
        self.reply = None
        self.pending_items.clear()
        if self.cache is not None:
            release = getattr(self.cache, "release", None)
            if release is not None:
                release()
            self.cache = None
        self.tokenizer_stream = None

    def sync_cache(self, target_ids: list[int], prefill: Callable[[list[int]], object]) -> object | None:
        """Make the cache hold `target_ids`: keep the common prefix, prefill the rest.

        Returns the last prefill's logits (None if nothing needed prefilling). Counts prefilled ids.
        """
        cached = list(self.cache.token_ids)
        keep = common_prefix_len(cached, target_ids)
        if keep < len(cached):
            self.cache.truncate(keep)
        if keep == len(target_ids):
            return None
        new_ids = target_ids[keep:]
        self.prefilled_tokens += len(new_ids)
        return prefill(new_ids)

    def end_reply(self, keep_generated: int) -> None:
        """Close the reply: the history takes its prompt and the first `keep_generated` generated ids."""
        reply = self.reply
        self.reply = None
        if reply is None or not reply.started:
            return
        self.history.add_reply(reply.generated_ids[:keep_generated])
        reply.kept_ids = keep_generated
        self.last_reply = reply
        kept = len(reply.prompt_ids) + keep_generated
        if self.cache is not None and self.cache.length > kept:
            self.cache.truncate(kept)
        self.turns_done += 1

    def trim_last_reply(self, keep_generated: int) -> None:
        """A barge-in after the reply finished generating (its audio was still playing): cut it back."""
        reply = self.last_reply
        if reply is None or keep_generated >= reply.kept_ids:
            return
        turn = self.history.turns[-1]
        del turn[len(turn) - reply.kept_ids + keep_generated :]
        reply.kept_ids = keep_generated
        if self.cache is not None:
            self.cache.truncate(common_prefix_len(list(self.cache.token_ids), self.history.ids()))

    def abandon_reply(self) -> None:
        """A failed reply leaves no trace: the history stays as before it, the cache is cut back."""
        if self.reply is not None and self.reply.started:
            del self.history.turns[self.reply.turns_before :]
        self.reply = None
        if self.cache is not None:
            self.cache.truncate(common_prefix_len(list(self.cache.token_ids), self.history.ids()))

"""One call's conversation as the engine thread sees it: the history as token ids, the pending user
input, the reply in progress, and the token source's per-call context (KV cache, prompt in progress).

Everything here is touched only by the engine thread (the call's session object on the asyncio
side just sends commands). The history is a `pipeline.lm.history.DialogueHistory` (system block + the
conversation's items as ids). The token source keeps its context a prefix of the history
(pipeline/engine/token_source.py): the next reply's prompt is the history plus the pending items and the
reply's header, and only what differs from the
context is prefilled, so turn 2 prefills only its new tokens and an early prefill of the user's first
4 s blocks is reused when those tokens stand.

Barge-in keeps what the user heard: `played_ms / 80 ms` speech tokens (one speech token = 80 ms,
pipeline/audio_format.py) and the text tokens generated before the last heard one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pipeline.audio_format import SPEECH_TOKEN_MS
from pipeline.engine.reply import InputItem, ReplyState
from pipeline.lm.history import MESSAGE, USER, DialogueHistory, Segment
from pipeline.responder import SessionSettings, TranscriptEvent

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

    from pipeline.lm.kv_cache import LMCache
    from pipeline.tokenizer.stream import TokenizerStream


@dataclass
class PendingInput:
    """Items waiting for a reply (user turns, text messages), bounded: past either limit everything pending
    is dropped and the next reply fails with `input_too_large` (the work a caller can queue stays bounded)."""

    max_items: int
    max_tokens: int
    items: list[InputItem] = field(default_factory=list)
    tokens: int = 0
    overflowed: bool = False

    def has_room(self) -> bool:
        """Another item may come (checked before the item is tokenised); False marks the overflow."""
        if len(self.items) >= self.max_items:
            self._overflow()
        return not self.overflowed

    def add(self, item: InputItem, index: int | None = None) -> None:
        """Append `item`, or insert it at `index`."""
        if not self.has_room():
            return
        if self.tokens + len(item.block_ids) > self.max_tokens:
            self._overflow()
            return
        self.items.insert(len(self.items) if index is None else index, item)
        self.tokens += len(item.block_ids)

    def index_of(self, key: int) -> int | None:
        return next((i for i, item in enumerate(self.items) if item.key == key), None)

    def take(self) -> list[InputItem]:
        items, self.items, self.tokens, self.overflowed = self.items, [], 0, False
        return items

    def put_back(self, items: list[InputItem]) -> None:
        """Input of a reply cancelled before it started: it is answered by the next one."""
        self.items = items + self.items
        self.tokens = sum(len(i.block_ids) for i in self.items)

    def _overflow(self) -> None:
        self.overflowed = True
        self.items.clear()
        self.tokens = 0


class SourceJob(Protocol):
    """A token source's prompt work for one call (`PromptJob` here, `vllm_source.RemoteJob`): typed by
    shape so this module imports no token source (they import it)."""

    ids: list[int]  # the prompt the call's context is to hold


@dataclass
class PromptJob:
    """The local token source's prefill in progress: the cache holds a prefix of `ids`, one chunk more per
    step."""

    ids: list[int]
    for_reply: bool  # a reply waits for the logits of the last position
    prefilled: int = 0  # ids this job computed (what the cache held already was kept)
    logits: Tensor | None = None  # (V,) float32 of the last position, once done (for_reply)


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
class Dialogue:
    """Per-call state, owned by the engine thread."""

    call_id: str
    settings: SessionSettings
    pending: PendingInput
    history: DialogueHistory | None = None  # set when the engine opens the call
    cache: LMCache | None = None  # the local token source's KV slot; None once the call is closed
    prompt_job: SourceJob | None = None  # the token source's prompt/request in progress
    tokenizer_stream: TokenizerStream | None = None
    partial_audio_tokens: list[int] = field(default_factory=list)  # final tokens of the open user speech
    audio_pushed: bool = False
    turn_audio: list[np.ndarray] = field(
        default_factory=list
    )  # the open turn's 16 kHz chunks (transcription)
    emit_transcript: Callable[[TranscriptEvent], None] | None = None  # thread-safe, into the session's stream
    early_prefill_wanted: bool = False  # final speech tokens arrived that the context does not hold yet
    tokens_ready_t: float | None = None
    reply: ReplyState | None = None
    last_reply: ReplyState | None = None  # the newest ended reply (a barge-in may still trim it)
    turn_prefilled_tokens: list[int] = field(default_factory=list)  # per reply: ids its prompt prefilled
    turn_prompt_lengths: list[int] = field(default_factory=list)  # per reply: its whole prompt, ids
    speech_input: bool = True  # the system prompt's input mode; a reply without a user item keeps it
    closed: bool = False

    def end_reply(self, keep_generated: int) -> None:
        """Close the reply: its segment in the history takes the first `keep_generated` generated ids."""
        reply, self.reply = self.reply, None
        if reply is None or not reply.started or self.history.position(reply.gen.reply_segment) is None:
            return
        self.history.extend_reply(reply.gen.reply_segment, reply.gen.generated_ids[:keep_generated])
        reply.gen.kept_ids = keep_generated
        self.last_reply = reply

    def trim_reply(self, reply: ReplyState, keep_generated: int) -> bool:
        """An ended reply was cut off at what the user heard (a barge-in while its audio played, or the
        client's truncate of any earlier reply): cut its ids in the history back. Returns whether the
        history changed."""
        segment = reply.gen.reply_segment
        if segment is None or self.history.position(segment) is None or keep_generated >= reply.gen.kept_ids:
            return False
        self.history.cut_reply(segment, reply.gen.kept_ids - keep_generated)
        reply.gen.kept_ids = keep_generated
        return True

    def add_item(self, item: InputItem, after: int | str | None, at_start: bool) -> bool:
        """A new item: at the end (pending, `after` None), first in the conversation (`at_start`), or right
        after the item named `after` (pending or in the history; one the engine no longer holds: at the
        end). Returns whether the history changed."""
        pending = self.pending
        if not at_start and after is not None:
            index = pending.index_of(after) if isinstance(after, int) else None
            if index is not None:
                pending.add(item, index + 1)
                return False
            index = self.history.index_of(after)
        else:
            index = -1 if at_start else None
        if index is None:
            pending.add(item)
            return False
        kind = USER if item.speech_input is not None else MESSAGE
        self.history.insert(index + 1, Segment(kind, list(item.block_ids), item.key))
        return True

    def delete_item(self, key: int) -> bool:
        """The user or message item `key` leaves: from the pending input, or from the history. The input
        of the reply in progress stays (the server refuses that). Returns whether the history changed."""
        index = self.pending.index_of(key)
        if index is not None:
            kept = self.pending.items[:index] + self.pending.items[index + 1 :]
            self.pending.items = []
            self.pending.put_back(kept)
            return False
        index = self.history.index_of(key)
        if index is None or (
            self._editing_reply() and self.history.segments[index] in self.reply.gen.segments
        ):
            return False
        self.history.remove_item(index)
        return True

    def delete_reply(self, reply: ReplyState) -> bool:
        """An ended reply leaves the history. Returns whether the history changed."""
        index = None if reply.gen.reply_segment is None else self.history.position(reply.gen.reply_segment)
        if reply is self.reply or index is None:
            return False
        self.history.remove_reply(index)
        reply.gen.kept_ids = 0
        return True

    def _editing_reply(self) -> bool:
        """A reply's prompt is in the history: its own items cannot leave."""
        return self.reply is not None and self.reply.started

    def undo_start(self, reply: ReplyState) -> None:
        """What the reply's start added to the history leaves again (its input and its header)."""
        for segment in reply.gen.segments:
            self.history.remove(segment)

    def abandon_reply(self) -> None:
        """A failed reply leaves no trace: its input and its header leave the history."""
        if self.reply is not None and self.reply.started:
            self.undo_start(self.reply)
        self.reply = None

    def release(self) -> None:
        """Hangup: nothing of the call is kept (the token source frees its context)."""
        self.closed = True
        self.reply = None
        self.pending.take()
        self.tokenizer_stream = None
        self.turn_audio.clear()

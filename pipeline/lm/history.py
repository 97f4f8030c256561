"""One call's conversation as token ids, in GLM-4-Voice's prompt format: the system block, then items.

Torch-free. The history is kept as token ids: the user's speech tokens and the assistant's generated
text+speech ids exactly as the model produced them (the official demo re-tokenises decoded text, which
is not guaranteed to give back the same ids; ours never re-tokenises). Each item of the conversation is
one `Segment`, and the prompt is their concatenation (docs/lm.md, "Conversation items"):

    user      <|user|>\\n{speech or text}
    reply     <|assistant|>streaming_transcription\\n{generated ids}
    message   <|system|>\\n{text} (system, developer) or <|assistant|>\\n{text} (assistant text)

so a user item and the reply to it are exactly the official turn
`<|user|>\\n…<|assistant|>streaming_transcription\\n…`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline.lm.prompt import reply_header_ids
from pipeline.lm.text_tokenizer import GLMTokenizer

log = logging.getLogger(__name__)

USER, REPLY, MESSAGE = "user", "reply", "message"  # Segment.kind


@dataclass(eq=False)  # compared by identity: a reply knows the segments it added
class Segment:
    """One conversation item as prompt ids."""

    kind: str  # USER, REPLY or MESSAGE
    ids: list[int]
    key: int | str | None = None  # the caller's name for the item (user/message: an index; reply: its id)


@dataclass
class DialogueHistory:
    """The system block and the conversation's items as ids.

    `length` is kept as items change, so appending an item and fitting the context cost what they add or
    drop, not the whole history (`ids()` builds the full list once, for a prefill).
    """

    tokenizer: GLMTokenizer
    system_ids: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._length = len(self.system_ids) + sum(len(s.ids) for s in self.segments)
        self.header = reply_header_ids(self.tokenizer)

    @property
    def length(self) -> int:
        return self._length

    def ids(self) -> list[int]:
        return [t for ids in (self.system_ids, *(s.ids for s in self.segments)) for t in ids]

    @property
    def turns(self) -> list[list[int]]:
        """The items grouped as turns (the items before a reply, and the reply), each as ids: a view."""
        turns: list[list[int]] = [[]]
        for s in self.segments:
            turns[-1].extend(s.ids)
            if s.kind == REPLY:
                turns.append([])
        return turns if turns[-1] else turns[:-1]

    def set_system(self, system_ids: list[int]) -> None:
        """Replace the system block (input mode or instructions changed: the cache re-prefills from there)."""
        if self.system_ids and system_ids != self.system_ids:
            log.info(
                "system block changed (input mode or instructions): the whole history is prefilled again"
            )
        self._length += len(system_ids) - len(self.system_ids)
        self.system_ids = list(system_ids)

    # ----- adding -----------------------------------------------------------------------------------

    def insert(self, index: int, segment: Segment) -> Segment:
        self.segments.insert(index, segment)
        self._length += len(segment.ids)
        return segment

    def append(self, segment: Segment) -> Segment:
        return self.insert(len(self.segments), segment)

    def begin_reply(self, key: int | str | None = None) -> Segment:
        """The assistant header of a new reply; its ids follow with `extend_reply`."""
        return self.append(Segment(REPLY, list(self.header), key))

    def extend_reply(self, segment: Segment, reply_ids: list[int]) -> None:
        """The reply's ids, without the stop token (as the official history)."""
        kept = [t for t in reply_ids if t not in self.tokenizer.stop_ids]
        segment.ids.extend(kept)
        self._length += len(kept)

    def add_reply(self, reply_ids: list[int]) -> None:
        """The ids of the newest reply (`begin_reply`)."""
        if not self.segments or self.segments[-1].kind != REPLY:
            raise ValueError("add_reply before begin_reply")
        self.extend_reply(self.segments[-1], reply_ids)

    # ----- finding ----------------------------------------------------------------------------------

    def index_of(self, key: int | str) -> int | None:
        """Index of the item named `key` (None: never added, dropped or deleted)."""
        return next((i for i, s in enumerate(self.segments) if s.key == key), None)

    def position(self, segment: Segment) -> int | None:
        return next((i for i, s in enumerate(self.segments) if s is segment), None)

    # ----- editing ----------------------------------------------------------------------------------

    def remove(self, segment: Segment) -> None:
        index = self.position(segment)
        if index is not None:
            self._length -= len(segment.ids)
            del self.segments[index]

    def cut_reply(self, segment: Segment, remove_tokens: int) -> None:
        """Remove the last `remove_tokens` ids of a reply (trimmed to what was heard); never its header."""
        remove_tokens = min(remove_tokens, len(segment.ids) - len(self.header))
        if remove_tokens > 0:
            del segment.ids[-remove_tokens:]
            self._length -= remove_tokens

    def remove_item(self, index: int) -> None:
        """A user or message item leaves. A reply behind it that kept nothing but its header goes too."""
        self.remove(self.segments[index])
        after = self.segments[index] if index < len(self.segments) else None
        if after is not None and after.kind == REPLY and after.ids == self.header:
            self.remove(after)

    def remove_reply(self, index: int) -> None:
        """A reply's ids leave; its header stays behind the user item it answers (the official turn shape
        keeps `<|user|>` and `<|assistant|>` alternating), else the whole segment goes."""
        segment = self.segments[index]
        before = self.segments[index - 1] if index > 0 else None
        if before is not None and before.kind == USER:
            self.cut_reply(segment, len(segment.ids))
        else:
            self.remove(segment)

    def fit(self, max_tokens: int, reserve_tokens: int = 0, keep_last: int = 1) -> int:
        """Drop the oldest items, each with the reply that follows it, until ids + `reserve_tokens` fit
        `max_tokens`; never the system block nor the last `keep_last` items.

        Returns how many items were dropped (and logs it); the caller re-prefills from the first changed
        id. Raises ValueError if even the system block and the kept items do not fit.
        """
        droppable = len(self.segments) - keep_last
        dropped = 0
        while self._length + reserve_tokens > max_tokens and dropped < droppable:
            self._length -= len(self.segments[dropped].ids)
            dropped += 1
            while dropped < droppable and self.segments[dropped].kind == REPLY:  # a reply goes with its input
                self._length -= len(self.segments[dropped].ids)
                dropped += 1
        del self.segments[:dropped]
        if self._length + reserve_tokens > max_tokens:
            raise ValueError(
                f"the system block and the newest items ({self._length} tokens) + {reserve_tokens} "
                f"reserved do not fit the {max_tokens}-token context"
            )
        if dropped:
            log.warning(
                "context full: dropped the %d oldest item(s); %d tokens remain", dropped, self._length
            )
        return dropped

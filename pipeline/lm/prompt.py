"""Prompt of the official demo (docs/lm.md) as token ids, the dialogue history, and the stream parser.

Torch-free. The history is kept as token ids: the user's speech tokens and the assistant's generated
text+speech ids exactly as the model produced them (the official demo re-tokenises decoded text, which
is not guaranteed to give back the same ids; ours never re-tokenises).
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass, field

from pipeline.lm.text_tokenizer import GLMTokenizer

log = logging.getLogger(__name__)

# Exact official strings (web_demo.py). Note the grammar, and the trailing space only in the audio one.
SYSTEM_PROMPT_AUDIO = (
    "User will provide you with a speech instruction. Do it step by step. First, think about the instruction "
    "and respond in a interleaved manner, with 13 text token followed by 26 audio tokens. "
)
SYSTEM_PROMPT_TEXT = (
    "User will provide you with a text instruction. Do it step by step. First, think about the instruction "
    "and respond in a interleaved manner, with 13 text token followed by 26 audio tokens."
)
ASSISTANT_METADATA = "streaming_transcription\n"  # after <|assistant|>: the interleaved-output mode


def system_block_ids(tok: GLMTokenizer, *, speech_input: bool, instructions: str | None = None) -> list[int]:
    """`[gMASK]<sop><|system|>\\n{system prompt}` with the user's instructions appended (docs/lm.md says
    why)."""
    system = SYSTEM_PROMPT_AUDIO if speech_input else SYSTEM_PROMPT_TEXT
    if instructions and instructions.strip():
        system = system + ("" if system.endswith(" ") else " ") + instructions.strip()
    return [*tok.prefix_ids, tok.system_id, *tok.encode("\n" + system)]


def user_turn_ids(
    tok: GLMTokenizer, *, speech_tokens: list[int] | None = None, text: str | None = None
) -> list[int]:
    """`<|user|>\\n{speech or text}<|assistant|>streaming_transcription\\n`."""
    if (speech_tokens is None) == (text is None):
        raise ValueError("a user turn is either speech tokens or text")
    if speech_tokens is not None:
        audio = [tok.begin_of_audio_id, *(tok.audio_id(k) for k in speech_tokens), tok.end_of_audio_id]
        content = tok.encode("\n") + audio
    else:
        content = tok.encode("\n" + text)  # one BPE segment, as in the official prompt string
    return [tok.user_id, *content, tok.assistant_id, *tok.encode(ASSISTANT_METADATA)]


@dataclass
class DialogueHistory:
    """One call's conversation as token ids: the system block, then whole turns (user block + reply).

    `length` is kept as turns change, so appending a turn and fitting the context cost what they add or
    drop, not the whole history (`ids()` builds the full list once, for a prefill). Each turn also has a
    `key` (the user item it starts with, as the caller names it; None if unnamed) and the length of its
    user content, so one item can leave (`remove_user`, `remove_reply`): a turn is
    `<|user|>\\n{content}` + the assistant header `<|assistant|>streaming_transcription\\n` + the reply.
    """

    tokenizer: GLMTokenizer
    system_ids: list[int] = field(default_factory=list)
    turns: list[list[int]] = field(default_factory=list)  # each: user_turn_ids(...) + the reply's ids
    keys: list[int | None] = field(default_factory=list)  # per turn: its user item's key
    user_lens: list[int] = field(default_factory=list)  # per turn: ids of its user content (0: deleted)

    def __post_init__(self) -> None:
        self._length = len(self.system_ids) + sum(len(t) for t in self.turns)
        self._header = [self.tokenizer.assistant_id, *self.tokenizer.encode(ASSISTANT_METADATA)]
        if len(self.keys) != len(self.turns):  # turns given without their layout: whole user blocks, unnamed
            self.keys = [None] * len(self.turns)
            self.user_lens = [len(t) - len(self._header) for t in self.turns]

    @property
    def length(self) -> int:
        return self._length

    def ids(self) -> list[int]:
        return [t for ids in (self.system_ids, *self.turns) for t in ids]

    def set_system(self, system_ids: list[int]) -> None:
        """Replace the system block (input mode or instructions changed: the cache re-prefills from there)."""
        if self.system_ids and system_ids != self.system_ids:
            log.info(
                "system block changed (input mode or instructions): the whole history is prefilled again"
            )
        self._length += len(system_ids) - len(self.system_ids)
        self.system_ids = list(system_ids)

    def append_user_block(self, user_ids: list[int], key: int | None = None) -> None:
        """A new turn that starts with the user's block (`user_turn_ids`); `key` names its user item."""
        self.turns.append(list(user_ids))
        self.keys.append(key)
        self.user_lens.append(len(user_ids) - len(self._header))
        self._length += len(user_ids)

    def add_reply(self, reply_ids: list[int]) -> None:
        """The assistant's ids of the current turn, without the stop token (as the official history)."""
        if not self.turns:
            raise ValueError("add_reply before a user block")
        kept = [t for t in reply_ids if t not in self.tokenizer.stop_ids]
        self.turns[-1].extend(kept)
        self._length += len(kept)

    def turn_of(self, key: int) -> int | None:
        """Index of the turn whose user item is `key` (None: never added, dropped or deleted)."""
        return self.keys.index(key) if key in self.keys else None

    def reply_len(self, index: int) -> int:
        return len(self.turns[index]) - self.user_lens[index] - len(self._header)

    def cut_turn(self, index: int, remove_tokens: int) -> None:
        """Remove the last `remove_tokens` ids of turn `index`'s reply (a reply trimmed to what was heard)."""
        remove_tokens = min(remove_tokens, self.reply_len(index))
        if remove_tokens > 0:
            del self.turns[index][-remove_tokens:]
            self._length -= remove_tokens

    def remove_user(self, index: int) -> None:
        """The user item of turn `index` leaves: its content goes; the assistant header stays with the
        reply that follows it, if any (else the whole turn goes)."""
        if self.reply_len(index) == 0:
            self._remove_turn(index)
            return
        del self.turns[index][: self.user_lens[index]]
        self._length -= self.user_lens[index]
        self.user_lens[index] = 0

    def remove_reply(self, index: int) -> None:
        """The reply of turn `index` leaves (the whole turn if its user content left already)."""
        if self.user_lens[index] == 0:
            self._remove_turn(index)
        else:
            self.cut_turn(index, self.reply_len(index))

    def _remove_turn(self, index: int) -> None:
        self._length -= len(self.turns[index])
        del self.turns[index], self.keys[index], self.user_lens[index]

    def keep_turns(self, n_turns: int) -> None:
        """Keep the first `n_turns` turns (a failed reply's user blocks leave)."""
        self._length -= sum(len(t) for t in self.turns[n_turns:])
        del self.turns[n_turns:], self.keys[n_turns:], self.user_lens[n_turns:]

    def fit(self, max_tokens: int, reserve_tokens: int = 0) -> int:
        """Drop the oldest whole turns (never the newest) until ids + `reserve_tokens` fit `max_tokens`.

        Returns how many turns were dropped (and logs it); the caller re-prefills from the first changed
        id. Raises ValueError if even the system block and the newest turn do not fit.
        """
        dropped = 0
        while self._length + reserve_tokens > max_tokens and dropped < len(self.turns) - 1:
            self._length -= len(self.turns[dropped])
            dropped += 1
        del self.turns[:dropped], self.keys[:dropped], self.user_lens[:dropped]
        if self._length + reserve_tokens > max_tokens:
            raise ValueError(
                f"the system block and the newest turn ({self._length} tokens) + {reserve_tokens} "
                f"reserved do not fit the {max_tokens}-token context"
            )
        if dropped:
            log.warning(
                "context full: dropped the %d oldest turn(s); %d tokens remain", dropped, self._length
            )
        return dropped


@dataclass(frozen=True)
class ParsedToken:
    text: str  # newly complete text (possibly ''); UTF-8 sequences split over tokens wait for their end
    speech: int | None  # speech token value (id - audio_offset) or None
    stop: bool  # the id ends the reply (<|user|>, <|endoftext|>, <|observation|>)


class StreamParser:
    """Splits generated ids into text deltas, speech values and the stop, one id at a time."""

    def __init__(self, tokenizer: GLMTokenizer) -> None:
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text_ids: list[int] = []
        self.speech: list[int] = []
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> ParsedToken:
        tok = self.tokenizer
        if self.stopped:
            return ParsedToken("", None, True)
        if token_id in tok.stop_ids:
            self.stopped = True
            return ParsedToken(self.finish(), None, True)
        if tok.is_audio(token_id):
            self.speech.append(token_id - tok.audio_offset)
            return ParsedToken("", self.speech[-1], False)
        if tok.is_special(token_id):
            return ParsedToken("", None, False)  # e.g. <|begin_of_audio|>: structure, not text
        self.text_ids.append(token_id)
        delta = self._utf8.decode(tok.token_bytes(token_id))
        self.text += delta
        return ParsedToken(delta, None, False)

    def finish(self) -> str:
        """Flush an incomplete UTF-8 tail (as U+FFFD) at the end of a reply that stopped without a stop id."""
        tail = self._utf8.decode(b"", final=True)
        self.text += tail
        return tail

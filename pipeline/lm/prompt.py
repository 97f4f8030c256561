"""Prompt of the official demo (REFERENCE §4.2-4.4) as token ids, the dialogue history, and the stream parser.

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


@dataclass(frozen=True)
class SamplingOptions:
    """Official web demo defaults (§4.1); top_k 50 is transformers' default that generate applies there."""

    temperature: float = 0.2
    top_p: float = 0.8
    top_k: int = 50
    max_new_tokens: int = 2000  # demo UI default


def system_block_ids(tok: GLMTokenizer, *, speech_input: bool, instructions: str | None = None) -> list[int]:
    """`[gMASK]<sop><|system|>\\n{system prompt}` with the user's instructions appended (docs/lm.md says why)."""
    system = SYSTEM_PROMPT_AUDIO if speech_input else SYSTEM_PROMPT_TEXT
    if instructions and instructions.strip():
        system = system + ("" if system.endswith(" ") else " ") + instructions.strip()
    return [*tok.prefix_ids, tok.system_id, *tok.encode("\n" + system)]


def user_turn_ids(tok: GLMTokenizer, *, speech_tokens: list[int] | None = None, text: str | None = None) -> list[int]:
    """`<|user|>\\n{speech or text}<|assistant|>streaming_transcription\\n`."""
    if (speech_tokens is None) == (text is None):
        raise ValueError("a user turn is either speech tokens or text")
    if speech_tokens is not None:
        audio = [tok.begin_of_audio_id, *(tok.audio_id(k) for k in speech_tokens), tok.end_of_audio_id]
        content = tok.encode("\n") + audio
    else:
        content = tok.encode("\n" + text)  # one BPE segment, as in the official prompt string
    return [tok.user_id, *content, tok.assistant_id, *tok.encode(ASSISTANT_METADATA)]


def first_turn_ids(tok: GLMTokenizer, *, speech_tokens: list[int] | None = None, text: str | None = None,
                   instructions: str | None = None) -> list[int]:  # fmt: skip
    """The whole first prompt, identical to the official tokenizer on the official prompt string."""
    system = system_block_ids(tok, speech_input=speech_tokens is not None, instructions=instructions)
    return system + user_turn_ids(tok, speech_tokens=speech_tokens, text=text)


@dataclass
class DialogueHistory:
    """One call's conversation as token ids: the system block, then whole turns (user block + reply)."""

    tokenizer: GLMTokenizer
    system_ids: list[int] = field(default_factory=list)
    turns: list[list[int]] = field(default_factory=list)  # each: user_turn_ids(...) + the reply's ids
    dropped_turns: int = 0  # turns removed so far to fit the context

    def ids(self) -> list[int]:
        return [t for ids in (self.system_ids, *self.turns) for t in ids]

    def start_turn(self, *, speech_tokens: list[int] | None = None, text: str | None = None,
                   instructions: str | None = None) -> list[int]:  # fmt: skip
        """Append a user turn; returns the full prompt ids (history + new turn) to `prefill_to`.

        The system block follows the input mode and the instructions; when they change it is replaced
        (the cache then re-prefills from the first changed token).
        """
        system = system_block_ids(self.tokenizer, speech_input=speech_tokens is not None, instructions=instructions)
        if self.system_ids and system != self.system_ids:
            log.info("system block changed (input mode or instructions): the whole history is prefilled again")
        self.system_ids = system
        self.turns.append(user_turn_ids(self.tokenizer, speech_tokens=speech_tokens, text=text))
        return self.ids()

    def add_reply(self, reply_ids: list[int]) -> None:
        """The assistant's ids of the current turn, without the stop token (as the official history)."""
        if not self.turns:
            raise ValueError("add_reply before start_turn")
        self.turns[-1].extend(t for t in reply_ids if t not in self.tokenizer.stop_ids)

    def fit(self, max_tokens: int, reserve_tokens: int = 0) -> int:
        """Drop the oldest whole turns (never the newest) until ids + `reserve_tokens` fit `max_tokens`.

        Returns how many turns were dropped (and logs it); the caller re-prefills (`prefill_to` keeps the
        system block). Raises ValueError if even the system block and the newest turn do not fit.
        """
        dropped = 0
        while len(self.ids()) + reserve_tokens > max_tokens and len(self.turns) > 1:
            self.turns.pop(0)
            dropped += 1
        if len(self.ids()) + reserve_tokens > max_tokens:
            raise ValueError(f"the system block and the newest turn ({len(self.ids())} tokens) + {reserve_tokens} "
                             f"reserved do not fit the {max_tokens}-token context")  # fmt: skip
        if dropped:
            self.dropped_turns += dropped
            log.warning("context full: dropped the %d oldest turn(s); %d tokens remain", dropped, len(self.ids()))
        return dropped

    def reset(self) -> None:
        self.system_ids.clear()
        self.turns.clear()
        self.dropped_turns = 0


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

"""Prompt of the official demo (docs/lm.md, "Prompt") as token ids, and the stream parser.

Torch-free. The conversation's history as ids is `pipeline/lm/history.py`.
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass

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


def user_block_ids(
    tok: GLMTokenizer, *, speech_tokens: list[int] | None = None, text: str | None = None
) -> list[int]:
    """`<|user|>\\n{speech or text}`: a user item."""
    if (speech_tokens is None) == (text is None):
        raise ValueError("a user turn is either speech tokens or text")
    if speech_tokens is not None:
        audio = [tok.begin_of_audio_id, *(tok.audio_id(k) for k in speech_tokens), tok.end_of_audio_id]
        content = tok.encode("\n") + audio
    else:
        content = tok.encode("\n" + text)  # one BPE segment, as in the official prompt string
    return [tok.user_id, *content]


def reply_header_ids(tok: GLMTokenizer) -> list[int]:
    """`<|assistant|>streaming_transcription\\n`: what every reply's prompt ends with."""
    return [tok.assistant_id, *tok.encode(ASSISTANT_METADATA)]


def user_turn_ids(
    tok: GLMTokenizer, *, speech_tokens: list[int] | None = None, text: str | None = None
) -> list[int]:
    """`<|user|>\\n{speech or text}<|assistant|>streaming_transcription\\n`."""
    return user_block_ids(tok, speech_tokens=speech_tokens, text=text) + reply_header_ids(tok)


def message_block_ids(tok: GLMTokenizer, role: str, text: str) -> list[int]:
    """A text message of another role in GLM-4's chat format (docs/lm.md, "Conversation items"):
    `<|system|>\\n{text}` for system and developer, `<|assistant|>\\n{text}` for assistant text (no
    `streaming_transcription`: it is text, not interleaved speech), `<|user|>\\n{text}` for user."""
    if role == "user":
        return user_block_ids(tok, text=text)
    role_id = {"system": tok.system_id, "developer": tok.system_id, "assistant": tok.assistant_id}[role]
    return [role_id, *tok.encode("\n" + text)]


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

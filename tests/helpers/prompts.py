"""A user turn appended to a history the way the engine's scheduler does it (pipeline/engine/scheduler.py
`_start_reply`): the system block for the turn's input mode, the user item, then the reply's header; the
prompt is the whole history."""

from __future__ import annotations

from pipeline.lm.history import USER, DialogueHistory, Segment
from pipeline.lm.prompt import system_block_ids, user_block_ids
from pipeline.lm.text_tokenizer import GLMTokenizer


def start_turn(
    history: DialogueHistory,
    *,
    speech_tokens: list[int] | None = None,
    text: str | None = None,
    instructions: str | None = None,
) -> list[int]:
    """Append a user turn; returns the prompt ids the LM reads for its reply (`add_reply` adds the reply)."""
    speech_input = speech_tokens is not None
    history.set_system(
        system_block_ids(history.tokenizer, speech_input=speech_input, instructions=instructions)
    )
    history.append(Segment(USER, user_block_ids(history.tokenizer, speech_tokens=speech_tokens, text=text)))
    history.begin_reply()
    return history.ids()


def first_turn_ids(tok: GLMTokenizer, **turn) -> list[int]:
    """The prompt of a call's first reply (`turn`: as `start_turn`)."""
    return start_turn(DialogueHistory(tok), **turn)

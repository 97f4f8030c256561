"""Prompt ids against the official prompt strings, multi-turn history, instructions, the stream parser."""

from __future__ import annotations

import base64

import pytest

from pipeline.lm.history import MESSAGE, USER, DialogueHistory, Segment
from pipeline.lm.prompt import (
    ASSISTANT_METADATA,
    SYSTEM_PROMPT_AUDIO,
    SYSTEM_PROMPT_TEXT,
    StreamParser,
    message_block_ids,
    reply_header_ids,
    user_block_ids,
    user_turn_ids,
)
from pipeline.lm.text_tokenizer import GLMTokenizer
from pipeline.weights.random_text import write_tokenizer_files
from tests.helpers.prompts import first_turn_ids, start_turn


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> GLMTokenizer:
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d, num_audio_tokens=64, seed=2)
    return GLMTokenizer.from_pretrained(d)


def _official(tok: GLMTokenizer, text: str) -> list[int]:
    """What the official tokenizer does with a prompt string: [gMASK]<sop> + the string's ids."""
    return tok.prefix_ids + tok.encode(text)


def test_system_prompts_are_the_official_strings() -> None:
    # The official strings (docs/lm.md), verbatim (grammar and the audio prompt's trailing space included).
    assert SYSTEM_PROMPT_AUDIO == (
        "User will provide you with a speech instruction. Do it step by step. First, think about the "
        "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens. "
    )
    assert SYSTEM_PROMPT_TEXT == SYSTEM_PROMPT_AUDIO.replace("speech", "text").rstrip(" ")


def test_first_turn_equals_official_prompt(tok: GLMTokenizer) -> None:
    speech = [5, 0, 63, 17]
    audio = "<|begin_of_audio|>" + "".join(f"<|audio_{k}|>" for k in speech) + "<|end_of_audio|>"
    want = _official(
        tok, f"<|system|>\n{SYSTEM_PROMPT_AUDIO}<|user|>\n{audio}<|assistant|>streaming_transcription\n"
    )
    assert first_turn_ids(tok, speech_tokens=speech) == want
    text = "What's the weather like? 天气"
    want = _official(
        tok, f"<|system|>\n{SYSTEM_PROMPT_TEXT}<|user|>\n{text}<|assistant|>streaming_transcription\n"
    )
    assert first_turn_ids(tok, text=text) == want


def test_second_turn_follows_official_history(tok: GLMTokenizer) -> None:
    """Official: (previous prompt + decoded completion).strip() + the new user block, re-tokenised."""
    history = DialogueHistory(tok)
    prompt1 = start_turn(history, speech_tokens=[1, 2, 3])
    reply = tok.encode("Sure, here") + [tok.audio_id(k) for k in (9, 8, 7)] + [tok.user_id]
    history.add_reply(reply)  # the stop id is not kept
    prompt2 = start_turn(history, speech_tokens=[4])
    prev = tok.decode(prompt1[2:]) + tok.decode(reply[:-1])
    new = "<|user|>\n<|begin_of_audio|><|audio_4|><|end_of_audio|><|assistant|>streaming_transcription\n"
    assert prompt2 == _official(tok, prev.strip() + new)
    assert prompt2[: len(prompt1)] == prompt1  # the cache of turn 1 stays valid


def test_instructions_reach_the_system_block(tok: GLMTokenizer) -> None:
    plain = first_turn_ids(tok, speech_tokens=[1])
    styled = first_turn_ids(tok, speech_tokens=[1], instructions="Speak slowly, in a cheerful tone.")
    text = tok.decode(styled)
    assert SYSTEM_PROMPT_AUDIO + "Speak slowly, in a cheerful tone.<|user|>" in text
    # The official system prompt and the user/assistant blocks are unchanged around it.
    assert styled[-12:] == plain[-12:] and text.startswith("[gMASK]<sop><|system|>\n" + SYSTEM_PROMPT_AUDIO)
    history = DialogueHistory(tok)
    start_turn(history, speech_tokens=[1])
    changed = start_turn(history, speech_tokens=[2], instructions="Use a Sichuan dialect.")
    assert "Use a Sichuan dialect.<|user|>" in tok.decode(changed)


def test_stream_parser_text_speech_stop(tok: GLMTokenizer) -> None:
    text = "你好, 世界! ok"
    # Single-byte tokens (their ranks, read from tokenizer.model): multi-byte characters span several ids.
    ranks = {}
    for line in (tok.source / "tokenizer.model").read_text().splitlines():
        b64, rank = line.split()
        ranks[base64.b64decode(b64)] = int(rank)
    byte_ids = [ranks[bytes([b])] for b in text.encode()]
    ids = (
        byte_ids[:4]
        + [tok.audio_id(3), tok.audio_id(60)]
        + byte_ids[4:]
        + [tok.begin_of_audio_id, tok.user_id, 7]
    )
    parser = StreamParser(tok)
    events = [parser.push(i) for i in ids]
    deltas = [e.text for e in events]
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)
    assert deltas[:3] == ["", "", "你"]  # a 3-byte character appears when its last byte arrives
    assert [e.speech for e in events if e.speech is not None] == [3, 60]
    assert [e.stop for e in events] == [False] * (len(ids) - 2) + [True, True]
    assert parser.text == text and parser.speech == [3, 60] and parser.stopped
    parser.reset()
    assert parser.push(byte_ids[0]).text == "" and parser.finish() == "\ufffd"  # broken tail at the very end


def test_fit_keeps_system_and_newest_turn(tok: GLMTokenizer) -> None:
    history = DialogueHistory(tok)
    for k in range(4):
        start_turn(history, speech_tokens=[k] * 5)
        history.add_reply([tok.audio_id(1)] * 3)
    turn_len = len(history.turns[-1])
    total = len(history.ids())
    assert history.fit(total) == 0
    assert history.fit(total - 1) == 2 and len(history.turns) == 3  # a whole turn: user item and reply
    assert history.fit(len(history.system_ids) + turn_len, keep_last=2) == 4 and len(history.turns) == 1
    with pytest.raises(ValueError, match="do not fit"):
        history.fit(len(history.system_ids) + turn_len - 1, keep_last=2)


def test_history_length_follows_every_change(tok: GLMTokenizer) -> None:
    history = DialogueHistory(tok)
    start_turn(history, text="first")
    history.add_reply([*tok.encode("sure"), tok.audio_id(3), tok.user_id])  # the stop id is not kept
    history.set_system(history.system_ids + tok.encode(" be brief"))
    history.append(Segment(USER, user_block_ids(tok, speech_tokens=[1, 2]), key=1))
    reply = history.begin_reply("r2")
    history.extend_reply(reply, [tok.audio_id(4)] * 5)
    assert history.length == len(history.ids())
    history.cut_reply(reply, 3)
    assert history.length == len(history.ids()) and history.turns[-1][-2:] == [tok.audio_id(4)] * 2
    history.insert(0, Segment(MESSAGE, message_block_ids(tok, "system", "Be kind."), key=2))
    assert history.length == len(history.ids())
    history.remove(reply)
    assert history.length == len(history.ids()) and len(history.turns) == 2
    history.append(Segment(USER, user_block_ids(tok, text="again")))
    assert history.fit(history.length - 1) == 1  # the oldest item: the system message
    assert history.length == len(history.ids()) and history.segments[0].kind == USER


def test_fit_drops_many_turns_without_rebuilding_the_history(tok: GLMTokenizer, monkeypatch) -> None:
    """A flood of typed messages: fitting after 400 turns is one pass, not one id-list rebuild per dropped
    turn."""
    history = DialogueHistory(tok, system_ids=[tok.system_id])
    block = user_turn_ids(tok, text="a fairly long typed message " * 20)
    for _ in range(400):
        history.append(Segment(USER, block))
    rebuilt = []
    monkeypatch.setattr(DialogueHistory, "ids", lambda self: rebuilt.append(1) or [])
    assert history.fit(1 + 2 * len(block)) == 398
    assert rebuilt == [] and history.length == 1 + 2 * len(block)


def test_history_items_leave_by_key(tok: GLMTokenizer) -> None:
    """remove_item keeps the reply behind its assistant header; remove_reply drops the reply's ids (its
    header stays behind a user item), and a header with neither user item nor ids goes."""
    history = DialogueHistory(tok)
    header = reply_header_ids(tok)
    assert header == [tok.assistant_id, *tok.encode(ASSISTANT_METADATA)]
    blocks = [user_block_ids(tok, text=t) for t in ("one", "two", "three")]
    reply = [*tok.encode("sure"), tok.audio_id(5), tok.audio_id(6)]
    for key, block in enumerate(blocks):
        history.append(Segment(USER, block, key))
        history.extend_reply(history.begin_reply(f"r{key}"), reply)
    history.remove_item(history.index_of(0))
    assert history.turns[0] == header + reply and history.length == len(history.ids())
    history.remove_reply(history.index_of("r0"))  # nothing of turn 0 is left
    assert [s.key for s in history.segments] == [1, "r1", 2, "r2"]
    assert history.turns == [blocks[1] + header + reply, blocks[2] + header + reply]
    history.cut_reply(history.segments[history.index_of("r1")], 2)
    history.remove_reply(history.index_of("r2"))
    assert history.turns == [blocks[1] + header + reply[:-2], blocks[2] + header]
    assert history.length == len(history.ids())
    history.cut_reply(history.segments[history.index_of("r2")], 5)  # never into the header
    history.remove_item(history.index_of(2))  # its reply kept nothing: it goes too
    assert [s.key for s in history.segments] == [1, "r1"] and history.length == len(history.ids())


def test_message_items_in_glm_chat_format(tok: GLMTokenizer) -> None:
    """System and developer text is a `<|system|>` block, assistant text an `<|assistant|>` turn without
    the interleaved-output metadata, user text the official user block; inserted items keep their place."""
    assert tok.decode(message_block_ids(tok, "system", "Be brief.")) == "<|system|>\nBe brief."
    assert message_block_ids(tok, "developer", "Be brief.") == message_block_ids(tok, "system", "Be brief.")
    assert tok.decode(message_block_ids(tok, "assistant", "Hello!")) == "<|assistant|>\nHello!"
    assert message_block_ids(tok, "user", "Hi") == user_block_ids(tok, text="Hi")
    history = DialogueHistory(tok)
    start_turn(history, text="first")
    history.add_reply(tok.encode("ok"))
    history.insert(1, Segment(MESSAGE, message_block_ids(tok, "system", "Note."), key=7))
    text = tok.decode(history.ids()[len(history.system_ids) :])
    assert text == "<|user|>\nfirst<|system|>\nNote.<|assistant|>streaming_transcription\nok"

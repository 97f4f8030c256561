"""How much work one call can make the shared engine do: chunked prefill between other calls' steps,
bounded pending input (docs/engine.md). Counted in engine operations, not time."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.engine.config import EngineConfig
from pipeline.engine.thread import GLMVoiceResponder
from pipeline.lm.history import USER
from pipeline.lm.prompt import system_block_ids, user_turn_ids
from pipeline.responder import ReplyDone, ReplyError, SessionSettings, TextDelta
from tests.engine.test_engine import check_complete_reply, collect
from tests.helpers.engine import settled

CHUNK_TOKENS = 32
MAX_ITEMS = 8


@pytest.fixture(scope="module")
def responder(demo_dir):
    cfg = EngineConfig(
        demo_weights_dir=str(demo_dir),
        device="cpu",
        prefill_chunk_tokens=CHUNK_TOKENS,
        max_pending_items=MAX_ITEMS,
    )
    r = GLMVoiceResponder(cfg)
    asyncio.run(r.start())
    yield r
    asyncio.run(r.stop())


def _long_text(words: int) -> str:
    vocab = [
        "weather",
        "river",
        "mountain",
        "quietly",
        "seven",
        "orange",
        "lantern",
        "because",
        "over",
        "而且",
    ]
    return " ".join(vocab[(i * 7 + i // 3) % len(vocab)] for i in range(words))


async def test_a_long_prefill_goes_in_chunks_between_another_calls_decode_steps(
    responder, script, monkeypatch
):
    sched = responder.engine.scheduler
    lm, tok = sched.m.lm, sched.m.text
    ops: list[tuple[str, tuple[int, ...], int]] = []  # (kind, slots, tokens) in engine order
    real_prefill, real_decode = lm.prefill, lm.decode_step

    def prefill(cache, ids):
        ops.append(("prefill", (cache.slot,), len(ids)))
        return real_prefill(cache, ids)

    def decode_step(caches, ids):
        ops.append(("decode", tuple(c.slot for c in caches), len(ids)))
        return real_decode(caches, ids)

    monkeypatch.setattr(lm, "prefill", prefill)
    monkeypatch.setattr(lm, "decode_step", decode_step)
    talker, typist = (responder.open_session(name, SessionSettings()) for name in ("talker", "typist"))
    long_text = _long_text(600)
    prompt_tokens = len(system_block_ids(tok, speech_input=False)) + len(user_turn_ids(tok, text=long_text))
    assert prompt_tokens > 8 * CHUNK_TOKENS  # the case under test: many chunks

    talker.add_text("Hi.")
    started = asyncio.Event()
    talker_events = asyncio.create_task(
        collect(talker.respond(), lambda e, _: isinstance(e, TextDelta) and started.set())
    )
    await asyncio.wait_for(started.wait(), 30)  # the talker is generating
    typist.add_text(long_text)
    typist_events = await collect(typist.respond())
    check_complete_reply(await talker_events, script, tok)
    check_complete_reply(typist_events, script, tok)

    a, b = talker.dialogue.cache.slot, typist.dialogue.cache.slot
    chunks = [i for i, (kind, slots, _) in enumerate(ops) if kind == "prefill" and slots == (b,)]
    assert sum(ops[i][2] for i in chunks) == prompt_tokens
    assert all(ops[i][2] <= CHUNK_TOKENS for i in chunks) and len(chunks) >= prompt_tokens // CHUNK_TOKENS
    talker_steps_after = [
        i for i, (kind, slots, _) in enumerate(ops) if kind == "decode" and a in slots and i > chunks[0]
    ]
    between = [i for i in talker_steps_after if i < chunks[-1]]
    # every step while the talker still generated fed it one token between two of the typist's chunks
    assert len(between) >= min(len(chunks) - 1, len(talker_steps_after))
    assert len(between) > 0
    await talker.close()
    await typist.close()


async def test_pending_input_is_bounded(responder, script, monkeypatch):
    """400 typed messages of 4000 characters, then one response.create: bounded work, a clear error."""
    sched = responder.engine.scheduler
    tok = sched.m.text
    encoded_long: list[int] = []
    real_encode = tok.encode

    def encode(text: str, *args, **kwargs):
        if len(text) > 1000:
            encoded_long.append(len(text))
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(tok, "encode", encode)
    session = responder.open_session("flood", SessionSettings())
    prefilled = sched.stats()["prefilled_tokens"]
    message = ("all work and no play " * 200)[:4000]
    for _ in range(400):
        session.add_text(message)
    events = await collect(session.respond())
    assert len(events) == 1 and isinstance(events[0], ReplyError) and events[0].code == "input_too_large"
    assert len(encoded_long) <= MAX_ITEMS  # messages past the bound are not even tokenised
    await settled(responder.engine)
    assert sched.stats()["prefilled_tokens"] == prefilled  # no prefill for the rejected input
    assert session.dialogue.history.turns == [] and session.dialogue.pending.items == []

    # the call goes on: input within the bounds gets a reply, one user block per message
    for i in range(MAX_ITEMS):
        session.add_text(f"message {i}")
    check_complete_reply(await collect(session.respond()), script, tok)
    assert sum(s.kind == USER for s in session.dialogue.history.segments) == MAX_ITEMS
    session.add_text("one more")
    events = await collect(session.respond())
    assert isinstance(events[-1], ReplyDone) and events[-1].reason == "stop"
    await session.close()


async def test_early_prefill_never_passes_the_context(demo_dir, script):
    """While the user talks, the early prefill of a prompt that the reply's start will have to
    fit (drop old turns) is skipped, instead of failing with ContextFullError on every pushed block."""
    from tests.helpers.speech import synth_speech

    context = 420
    responder = GLMVoiceResponder(
        EngineConfig(demo_weights_dir=str(demo_dir), device="cpu", context_tokens=context)
    )
    await responder.start()
    try:
        sched = responder.engine.scheduler
        session = responder.open_session("long", SessionSettings())
        for text in ("Hi.", "Hello again.", "And once more."):  # scripted replies fill the history
            session.add_text(text)
            check_complete_reply(await collect(session.respond()), script, sched.m.text)
        assert len(session.dialogue.history.ids()) + context // 4 > context  # a new turn needs fit()
        errors, prefilled = sched.stats()["turn_errors"], sched.stats()["prefilled_tokens"]
        speech = synth_speech(
            "Good morning. This sentence is long enough to fill more than one four second "
            "block of the speech tokenizer while the user is still talking."
        )
        for start in range(0, speech.size, 512):
            session.push_audio(speech[start : start + 512])
        await settled(responder.engine)
        assert sched.stats()["turn_errors"] == errors
        assert sched.stats()["prefilled_tokens"] == prefilled  # nothing prefilled that fit() would discard
        session.commit_audio()
        check_complete_reply(await collect(session.respond()), script, sched.m.text)  # fit dropped old turns
        assert len(session.dialogue.history.ids()) <= context
        await session.close()
    finally:
        await responder.stop()


async def test_instructions_and_input_over_the_context_fail_cleanly(demo_dir, script, caplog):
    """Instructions and a typed message, each within its own limit but together over the context: the
    reply fails with `input_too_large` (no traceback), the history is kept, the call goes on."""
    context = 600
    responder = GLMVoiceResponder(
        EngineConfig(demo_weights_dir=str(demo_dir), device="cpu", context_tokens=context)
    )
    await responder.start()
    try:
        sched = responder.engine.scheduler
        tok = sched.m.text
        reserve = min(sched.cfg.max_new_tokens, context // 4)
        room = context - reserve - len(system_block_ids(tok, speech_input=False))
        words = 1
        while len(user_turn_ids(tok, text=_long_text(words))) < room * 2 // 3:
            words += 1
        text = _long_text(words)
        instructions = _long_text(words)  # each alone fits the room left for the system block and input
        assert len(system_block_ids(tok, speech_input=False, instructions=instructions)) + reserve < context
        assert len(user_turn_ids(tok, text=text)) < room
        session = responder.open_session("over", SessionSettings())
        session.add_text("Hi.")
        check_complete_reply(await collect(session.respond()), script, tok)
        history = list(session.dialogue.history.ids())
        errors = sched.stats()["turn_errors"]

        session.update(SessionSettings(instructions=instructions))
        session.add_text(text)
        with caplog.at_level("WARNING"):
            events = await collect(session.respond())
        assert len(events) == 1 and isinstance(events[0], ReplyError), events
        assert events[0].code == "input_too_large"
        assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info]
        assert sched.stats()["turn_errors"] == errors
        assert session.dialogue.history.ids() == history  # nothing dropped, nothing added
        assert session.dialogue.pending.items == []

        session.update(SessionSettings())  # the call goes on
        session.add_text("And now?")
        check_complete_reply(await collect(session.respond()), script, tok)
        await session.close()
    finally:
        await responder.stop()

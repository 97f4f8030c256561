"""The engine alone (no WebRTC), on demo weights: turns, history/cache, cancellation, isolation.

Expected replies come from the demo weights' own script (demo_script.json, computed from the tiny
tokenizer when the weights are written) and expected prompt lengths from pipeline.lm.prompt.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.engine.config import EngineConfig
from pipeline.engine.thread import GLMVoiceResponder
from pipeline.lm.prompt import ASSISTANT_METADATA, system_block_ids, user_turn_ids
from pipeline.responder import (
    AudioChunk,
    ReplyDone,
    ReplyError,
    SamplingSettings,
    SessionSettings,
    TextDelta,
    Timing,
)
from pipeline.weights.demo import MESSAGE
from tests.helpers.engine import settled
from tests.helpers.speech import have_speech_tools, synth_speech

STAGES = ["tokens_ready", "prefill_done", "first_text_token", "first_speech_token", "first_pcm"]


async def collect(turn, on_event=None, timeout_s: float = 60.0) -> list:
    events: list = []

    async def run() -> None:
        async for event in turn.events():
            events.append(event)
            if on_event is not None:
                on_event(event, events)

    await asyncio.wait_for(run(), timeout_s)
    return events


def audio_ms(events) -> float:
    return sum(1000.0 * e.pcm.size / e.sample_rate_hz for e in events if isinstance(e, AudioChunk))


def check_complete_reply(events, script, tok) -> None:
    assert isinstance(events[-1], ReplyDone) and events[-1].reason == "stop"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == MESSAGE
    assert events[-1].text == MESSAGE
    stages = [e.stage for e in events if isinstance(e, Timing)]
    assert stages == STAGES  # each once, in timeline order
    times = [e.t_monotonic_s for e in events if isinstance(e, Timing)]
    assert times == sorted(times)
    pcm = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
    n_speech = sum(tok.is_audio(i) for i in script["reply_ids"])
    assert audio_ms(events) >= 0.8 * n_speech * 80  # ~80 ms per speech token, all of them decoded
    assert float(np.sqrt(np.mean(pcm**2))) > 1e-3  # not silence
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
    assert first_text < first_audio  # text deltas come first, then audio (13 text before 26 speech)


def check_cache_matches_history(d) -> None:
    ids = d.history.ids()
    assert d.cache.token_ids == ids[: d.cache.length]
    assert d.cache.length >= len(ids) - 1  # at most the last sampled token waits for the next prefill


async def test_typed_turns_keep_history_and_prefill_only_new_tokens(responder, sched, script):
    tok = sched.m.text
    session = responder.open_session("typed", SessionSettings())
    session.add_text("Hello, who are you?")
    check_complete_reply(await collect(session.respond()), script, tok)
    d = session.dialogue
    first_prompt = system_block_ids(tok, speech_input=False) + user_turn_ids(tok, text="Hello, who are you?")
    assert d.history.ids() == first_prompt + script["reply_ids"]
    assert d.turn_prefilled_tokens == [len(first_prompt)]
    check_cache_matches_history(d)

    session.add_text("Tell me more.")
    check_complete_reply(await collect(session.respond()), script, tok)
    new_block = user_turn_ids(tok, text="Tell me more.")
    assert d.turn_prefilled_tokens[1] == len(new_block)  # turn 1 stayed cached: only the new tokens
    assert d.history.ids() == first_prompt + script["reply_ids"] + new_block + script["reply_ids"]
    check_cache_matches_history(d)
    await session.close()


@pytest.mark.skipif(not have_speech_tools(), reason="espeak-ng/sox missing")
async def test_spoken_turn_with_early_prefill(responder, sched, script):
    tok = sched.m.text
    speech = synth_speech(
        "Good morning. This sentence is long enough to fill more than one four second block "
        "of the speech tokenizer, so its first tokens are prefilled early."
    )
    assert speech.size > 4.5 * 16000
    session = responder.open_session("spoken", SessionSettings())
    prefilled_before = sched.stats()["prefilled_tokens"]
    half = 4 * 16000 + 8000  # the first 4 s block is complete, the user is still talking
    for start in range(0, speech.size, 512):  # VAD-sized chunks
        session.push_audio(speech[start : start + 512])
        if start <= half < start + 512:
            await settled(responder.engine)  # the engine caught up with the audio so far
            assert sched.stats()["prefilled_tokens"] > prefilled_before  # early prefill happened
    session.commit_audio()
    events = await collect(session.respond())
    check_complete_reply(events, script, tok)
    d = session.dialogue
    tokens = sched.m.speech_tokenizer.tokenize(speech)
    prompt = system_block_ids(tok, speech_input=True) + user_turn_ids(tok, speech_tokens=tokens)
    assert d.history.ids() == prompt + script["reply_ids"]  # the streamed tokens equal one-shot tokenize()
    # some of the prompt went in while the user was still talking (complete 4 s blocks)
    assert d.turn_prefilled_tokens[0] < len(prompt)
    assert sched.stats()["prefilled_tokens"] - prefilled_before >= len(prompt)
    check_cache_matches_history(d)
    await session.close()


def heard_ids(reply_ids, tok, played_ms: float) -> list[int]:
    """Reference: ids up to the last speech token the user heard (80 ms each)."""
    n = int(played_ms // 80)
    if n == 0:
        return []
    seen = 0
    for i, t in enumerate(reply_ids):
        seen += tok.is_audio(t)
        if seen == n:
            return reply_ids[: i + 1]
    return list(reply_ids)


@pytest.mark.parametrize(
    "stage",
    ["before_prefill", "prefill_done", "first_text", "first_speech_token", "first_audio", "second_audio"],
)
async def test_cancel_at_every_stage(responder, sched, script, stage):
    tok = sched.m.text
    session = responder.open_session(f"cancel-{stage}", SessionSettings())
    session.add_text("Interrupt me.")
    turn = session.respond()
    played = {}

    def on_event(event, events):
        hit = {
            "prefill_done": isinstance(event, Timing) and event.stage == "prefill_done",
            "first_text": isinstance(event, TextDelta),
            "first_speech_token": isinstance(event, Timing) and event.stage == "first_speech_token",
            "first_audio": isinstance(event, AudioChunk),
            "second_audio": isinstance(event, AudioChunk)
            and sum(isinstance(e, AudioChunk) for e in events) == 2,
        }.get(stage, False)
        if hit and "ms" not in played:
            played["ms"] = audio_ms(events) * 0.6  # the user heard part of what arrived
            turn.cancel(played_ms=played["ms"])

    if stage == "before_prefill":
        turn.cancel(played_ms=0.0)
        played["ms"] = 0.0
    events = await collect(turn, on_event)
    done = events[-1]
    assert isinstance(done, ReplyDone) and done.reason == "cancelled"
    assert sum(isinstance(e, ReplyDone | ReplyError) for e in events) == 1
    d = session.dialogue
    if stage == "before_prefill" and not d.history.turns:
        assert [i.text for i in d.pending.items] == ["Interrupt me."]  # never answered: stays pending
    else:
        block = user_turn_ids(tok, text="Interrupt me.")
        kept = heard_ids(script["reply_ids"], tok, played["ms"])
        assert d.history.turns[-1] == block + kept
        assert done.text == tok.decode([i for i in kept if not tok.is_audio(i)])
        check_cache_matches_history(d)
    # the call goes on: a new turn gets the whole reply and prefills only what the cache lacks
    cached = d.cache.length
    session.add_text("Go on.")
    check_complete_reply(await collect(session.respond()), script, tok)
    assert d.turn_prefilled_tokens[-1] == d.turn_prompt_lengths[-1] - cached or stage == "before_prefill"
    await session.close()


async def test_hangup_mid_reply_frees_the_cache(responder, sched):
    pool = sched.m.lm.pool
    session = responder.open_session("hangup", SessionSettings())
    session.add_text("Talk for a while.")
    turn = session.respond()
    closed = asyncio.Event()

    async def hang_up_on_first_audio() -> list:
        events = []
        async for event in turn.events():
            events.append(event)
            if isinstance(event, AudioChunk) and not closed.is_set():
                closed.set()
                asyncio.get_running_loop().create_task(session.close())
        return events

    events = await asyncio.wait_for(hang_up_on_first_audio(), 30)
    assert isinstance(events[-1], ReplyDone) and events[-1].reason == "cancelled"
    await session.close()  # idempotent; returns once the engine has freed the call
    d = session.dialogue
    assert d.cache is None and d.closed
    assert d not in sched.dialogues
    in_use = pool.capacity - len(pool._free)
    assert in_use == sum(1 for x in sched.dialogues if x.cache is not None)  # the slot went back to the pool


async def test_exception_in_one_call_reaches_only_that_call(responder, sched, script, monkeypatch):
    tok = sched.m.text
    worker = sched.decoder
    real = worker.decode_blocks

    def failing(jobs):
        faulty = {id(d.reply.audio.stream) for d in sched.dialogues if d.call_id == "faulty" and d.reply}
        results = real(jobs)
        return [
            RuntimeError("injected decoder fault") if id(job.stream) in faulty else result
            for job, result in zip(jobs, results, strict=True)
        ]

    monkeypatch.setattr(worker, "decode_blocks", failing)
    good, bad = (responder.open_session(c, SessionSettings()) for c in ("healthy", "faulty"))
    good.add_text("Hi.")
    bad.add_text("Hi.")
    good_events, bad_events = await asyncio.gather(collect(good.respond()), collect(bad.respond()))
    check_complete_reply(good_events, script, tok)
    assert isinstance(bad_events[-1], ReplyError) and "injected decoder fault" in bad_events[-1].message
    assert not any(isinstance(e, AudioChunk) for e in bad_events)
    assert bad.dialogue.history.turns == []  # the failed turn left no trace
    check_cache_matches_history(bad.dialogue)
    monkeypatch.setattr(worker, "decode_blocks", real)
    bad.add_text("Hi again.")
    check_complete_reply(await collect(bad.respond()), script, tok)  # the call recovers
    await good.close()
    await bad.close()


async def test_concurrent_calls_batch_their_decode_steps(responder, sched, script):
    tok = sched.m.text
    before = sched.stats()
    sessions = [responder.open_session(f"conc{i}", SessionSettings()) for i in range(3)]
    for i, s in enumerate(sessions):
        s.add_text(f"Call number {i}.")
    results = await asyncio.gather(*(collect(s.respond()) for s in sessions))
    for events in results:
        check_complete_reply(events, script, tok)
    steps = sched.stats()["decode_steps"] - before["decode_steps"]
    rows = sched.stats()["decoded_rows"] - before["decoded_rows"]
    assert rows == 3 * (len(script["reply_ids"]))  # one decode row per generated token that was fed back
    assert steps < rows  # several calls shared forward passes
    for s in sessions:
        await s.close()


async def test_instructions_and_sampling_reach_the_model(responder, sched, monkeypatch):
    tok = sched.m.text
    seen = []
    import pipeline.engine.token_source as token_source_module

    real_sample = token_source_module.sample_rows

    def recording_sample(logits, rows):
        seen.extend((r.temperature, r.top_p, r.top_k) for r in rows)
        return real_sample(logits, rows)

    monkeypatch.setattr(token_source_module, "sample_rows", recording_sample)
    settings = SessionSettings(
        instructions="Speak like a pirate, slowly.",
        sampling=SamplingSettings(temperature=0.05, top_p=0.5, top_k=7, max_new_tokens=30),
    )
    session = responder.open_session("settings", SessionSettings())
    session.update(settings)
    session.add_text("Hi.")
    events = await collect(session.respond())
    assert events[-1].reason == "length"  # max_new_tokens reached
    assert set(seen) == {(0.05, 0.5, 7)}
    d = session.dialogue
    assert d.history.system_ids == system_block_ids(
        tok, speech_input=False, instructions=settings.instructions
    )
    assert len(d.history.turns[-1]) == len(user_turn_ids(tok, text="Hi.")) + 30
    await session.close()


def test_info_reports_demo_weights(responder):
    info = responder.info()
    assert info.ready and info.name == "glm4voice"
    assert info.details["weights"] == "demo"
    assert info.details["device"] == "cpu" and info.details["dtype"] == "float32"
    assert info.output_sample_rate_hz == 22050


async def test_barge_in_after_generation_ended_trims_the_history(responder, sched, script):
    """Generation runs ahead of playback: the cancel can come after ReplyDone and still cuts the history."""
    tok = sched.m.text
    session = responder.open_session("late-cancel", SessionSettings())
    session.add_text("Say it all.")
    turn = session.respond()
    events = await collect(turn)
    assert events[-1].reason == "stop"
    turn.cancel(played_ms=1500.0)  # the user talked over the reply 1.5 s into its playback
    await settled(responder.engine)
    d = session.dialogue
    assert d.history.turns[-1] == user_turn_ids(tok, text="Say it all.") + heard_ids(
        script["reply_ids"], tok, 1500.0
    )
    check_cache_matches_history(d)
    session.add_text("Next.")
    check_complete_reply(await collect(session.respond()), script, tok)
    assert d.turn_prefilled_tokens[-1] == len(user_turn_ids(tok, text="Next."))
    await session.close()


async def test_truncate_after_a_cut_cuts_further_and_reports_the_heard_transcript(responder, sched, script):
    """conversation.item.truncate: a second, shorter played_ms (what the client says it played) cuts the
    history again; heard_transcript gives the text the history keeps at a cut."""
    tok = sched.m.text
    session = responder.open_session("truncate", SessionSettings())
    session.add_text("Say it all.")
    turn = session.respond()
    events = await collect(turn)
    assert events[-1].reason == "stop"
    turn.cancel(played_ms=2000.0)  # the server's cut at speech start
    turn.cancel(played_ms=2500.0)  # a longer report cannot un-cut
    turn.cancel(played_ms=900.0)  # the client played only 0.9 s
    await settled(responder.engine)
    d = session.dialogue
    kept = heard_ids(script["reply_ids"], tok, 900.0)
    assert d.history.turns[-1] == user_turn_ids(tok, text="Say it all.") + kept
    check_cache_matches_history(d)
    assert turn.heard_transcript(900.0) == tok.decode([i for i in kept if not tok.is_audio(i)])
    full = [i for i in script["reply_ids"] if not tok.is_audio(i)]
    assert turn.heard_transcript(1e9) == tok.decode(full)
    await session.close()


async def test_delete_user_item_leaves_the_next_prompt_and_the_cache_follows(responder, sched, script):
    """conversation.item.delete of a user item: typed turns A and B, A's user item deleted; the next
    turn's prompt no longer holds A's block (A's reply stays, behind its assistant header), the cache
    equals the history again once the engine is idle, and the next turn prefills only its new block. A
    pending item can leave too."""
    tok = sched.m.text
    session = responder.open_session("delete-user", SessionSettings())
    session.add_text("Question A.")  # user item 0
    await collect(session.respond())
    session.add_text("Question B.")  # user item 1
    await collect(session.respond())
    d = session.dialogue
    system = system_block_ids(tok, speech_input=False)
    block_a, block_b = user_turn_ids(tok, text="Question A."), user_turn_ids(tok, text="Question B.")
    reply = script["reply_ids"]
    assert d.history.ids() == system + block_a + reply + block_b + reply

    session.delete_item(0)
    await settled(responder.engine)
    header = [tok.assistant_id, *tok.encode(ASSISTANT_METADATA)]
    assert d.history.ids() == system + header + reply + block_b + reply
    check_cache_matches_history(d)

    session.add_text("Question C.")  # user item 2: deleted before it is answered
    session.add_text("Question D.")  # user item 3
    session.delete_item(2)
    check_complete_reply(await collect(session.respond()), script, tok)
    block_d = user_turn_ids(tok, text="Question D.")
    prompt = d.last_reply.gen.prompt_ids
    assert prompt == system + header + reply + block_b + reply + block_d
    assert block_a[: -len(header)] not in [
        prompt[i : i + len(block_a) - len(header)] for i in range(len(prompt))
    ]
    assert d.turn_prefilled_tokens[-1] == len(block_d)  # the edited history was prefilled again while idle
    check_cache_matches_history(d)
    await session.close()


async def test_delete_reply_and_truncate_an_older_reply(responder, sched, script):
    """conversation.item.delete of an assistant item removes its reply ids; conversation.item.truncate of
    a reply that is not the latest cuts it to the heard prefix; the cache follows both."""
    tok = sched.m.text
    session = responder.open_session("delete-reply", SessionSettings())
    session.add_text("Question A.")
    turn_a = session.respond()
    await collect(turn_a)
    session.add_text("Question B.")
    turn_b = session.respond()
    await collect(turn_b)
    d = session.dialogue
    reply = script["reply_ids"]
    block_a, block_b = user_turn_ids(tok, text="Question A."), user_turn_ids(tok, text="Question B.")

    turn_a.cancel(played_ms=900.0)  # the client reports it played 0.9 s of the older reply
    await settled(responder.engine)
    kept_a = heard_ids(reply, tok, 900.0)
    assert len(kept_a) < len(reply)
    assert d.history.turns == [block_a + kept_a, block_b + reply]
    check_cache_matches_history(d)
    assert turn_a.heard_transcript(900.0) == tok.decode([i for i in kept_a if not tok.is_audio(i)])

    session.delete_item(turn_b)
    await settled(responder.engine)
    assert d.history.turns == [block_a + kept_a, block_b]
    check_cache_matches_history(d)

    session.add_text("Question C.")
    check_complete_reply(await collect(session.respond()), script, tok)
    system = system_block_ids(tok, speech_input=False)
    assert d.last_reply.gen.prompt_ids == system + block_a + kept_a + block_b + user_turn_ids(
        tok, text="Question C."
    )
    check_cache_matches_history(d)
    await session.close()


async def test_stop_answers_every_waiter(demo_dir):
    r = GLMVoiceResponder(EngineConfig(demo_weights_dir=str(demo_dir), device="cpu"))
    await r.start()
    session = r.open_session("stopping", SessionSettings())
    session.add_text("Hello?")
    turn = session.respond()
    await r.stop()
    events = await collect(turn, timeout_s=10)
    assert isinstance(events[-1], ReplyDone | ReplyError)
    await asyncio.wait_for(session.close(), 5)  # returns although the engine is gone
    assert not r.info().ready
    with pytest.raises(RuntimeError, match="not ready"):
        r.open_session("late", SessionSettings())


def test_weights_resolution_errors(tmp_path):
    from pipeline.weights.resolve import WeightsError, resolve_weights

    with pytest.raises(WeightsError, match="require_weights"):
        resolve_weights(EngineConfig(require_weights=True, device="cpu"))
    (tmp_path / "glm-4-voice-9b").mkdir()
    (tmp_path / "glm-4-voice-9b" / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="glm-4-voice-tokenizer does not exist"):
        resolve_weights(EngineConfig(weights_dir=str(tmp_path), device="cpu"))
    for name in ("glm-4-voice-tokenizer", "glm-4-voice-decoder"):
        (tmp_path / name).mkdir()
    with pytest.raises(
        WeightsError, match="tokenizer-?.* is incomplete: missing config.json, preprocessor_config.json"
    ):
        resolve_weights(EngineConfig(weights_dir=str(tmp_path), device="cpu"))
    with pytest.raises(WeightsError, match="int4"):
        resolve_weights(EngineConfig(quantization="int4", device="cpu"))
    with pytest.raises(WeightsError, match="dtype"):
        resolve_weights(EngineConfig(dtype="float8", device="cpu"))

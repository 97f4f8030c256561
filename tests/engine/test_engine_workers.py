"""The LM thread and the decoder worker (docs/engine.md, "Two threads"), on demo weights.

The worker's `decode_blocks` seam is wrapped by `GatedDecoder`: it records which calls each batch holds,
can hold batches until the test lets them go (a semaphore, no sleeps) and can fail chosen calls' blocks.
`Handovers` records the blocks the LM thread hands to the worker. Both run on the engine's threads and
report to the test through thread-safe queues.
"""

from __future__ import annotations

import asyncio
import queue
import threading

import numpy as np
import pytest

from pipeline.engine.config import EngineConfig
from pipeline.engine.models import new_decoder_stream
from pipeline.engine.thread import GLMVoiceResponder
from pipeline.lm.prompt import user_turn_ids
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
from tests.engine.test_engine import audio_ms, check_cache_matches_history, check_complete_reply, heard_ids

WAIT_S = 60.0  # every wait of these tests has this deadline


class GatedDecoder:
    def __init__(self, sched, real) -> None:
        self.sched, self.real = sched, real
        self.holding = False
        self.permits = threading.Semaphore(0)
        self.entered: queue.Queue[list[str]] = queue.Queue()  # each batch's call ids, as it enters
        self.batches: list[list[str]] = []
        self.failing: set[str] = set()  # call ids whose blocks fail

    def _call_of(self, stream) -> str:
        return next(
            (d.call_id for d in self.sched.dialogues if d.reply and d.reply.audio.stream is stream), "?"
        )

    def __call__(self, jobs):
        calls = [self._call_of(job.stream) for job in jobs]
        self.batches.append(calls)
        self.entered.put(calls)
        if self.holding and not self.permits.acquire(timeout=WAIT_S):
            raise TimeoutError("the test never let this batch go")
        results = self.real(jobs)
        return [
            RuntimeError("injected decoder fault") if call in self.failing else result
            for call, result in zip(calls, results, strict=True)
        ]

    def hold(self) -> None:
        self.holding = True

    def let_one_go(self) -> None:
        self.permits.release()

    def open(self) -> None:
        self.holding = False
        self.permits.release(1000)

    async def next_batch(self) -> list[str]:
        return await asyncio.to_thread(self.entered.get, True, WAIT_S)


class Handovers:
    def __init__(self, worker) -> None:
        self.real = worker.submit
        self._seen: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, block) -> None:
        self.real(block)
        with self._cond:
            self._seen.append(block.reply.reply_id)
            self._cond.notify_all()

    def _wait(self, reply_id: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: reply_id in self._seen, WAIT_S):
                raise TimeoutError(f"no block of {reply_id} was handed over")

    async def handed_over(self, *replies) -> None:
        for reply in replies:
            await asyncio.to_thread(self._wait, reply.reply_id)


@pytest.fixture
def gate(sched, monkeypatch):
    g = GatedDecoder(sched, sched.decoder.decode_blocks)
    monkeypatch.setattr(sched.decoder, "decode_blocks", g)
    yield g
    g.open()  # a failed test must not leave the worker held


@pytest.fixture
def handovers(sched, monkeypatch):
    h = Handovers(sched.decoder)
    monkeypatch.setattr(sched.decoder, "submit", h)
    return h


class Listener:
    """Collects a reply's events in a task; `until(pred)` waits for an event that matches."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.events: list = []
        self._changed = asyncio.Condition()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> list:
        async for event in self.reply.events():
            self.events.append(event)
            async with self._changed:
                self._changed.notify_all()
        return self.events

    async def until(self, pred) -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: any(pred(e, self.events) for e in self.events))

        await asyncio.wait_for(wait(), WAIT_S)

    async def done(self) -> list:
        return await asyncio.wait_for(self.task, WAIT_S)

    def nothing_after_the_end(self) -> None:
        """The reply's stream ended and nothing was delivered behind its end event."""
        assert self.task.done() and self.reply._events.empty()

    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))


def is_audio(event, _events) -> bool:
    return isinstance(event, AudioChunk)


def is_end(event, _events) -> bool:
    return isinstance(event, ReplyDone | ReplyError)


def start(responder, call_id: str, text: str = "Hi.", max_new_tokens: int = 2000):
    settings = SessionSettings(sampling=SamplingSettings(max_new_tokens=max_new_tokens))
    session = responder.open_session(call_id, settings)
    session.add_text(text)
    reply = session.respond()
    return session, reply, Listener(reply)


def only_end_after(events: list, index: int) -> None:
    """Nothing but the one end event after `events[index]`."""
    assert all(is_end(e, events) for e in events[index + 1 :]) and is_end(events[-1], events)
    assert sum(is_end(e, events) for e in events) == 1


async def test_each_calls_audio_comes_in_order(responder, sched, gate):
    """Three calls of different lengths share the worker; each call's PCM is its own speech values decoded
    alone, in order (a block out of order or from another call would change it)."""
    tok = sched.m.text
    lengths = [61, 77, 94]  # ids per reply: different speech tails
    calls = [start(responder, f"order{i}", max_new_tokens=n) for i, n in enumerate(lengths)]
    for session, reply, listener in calls:
        events = await listener.done()
        assert isinstance(events[-1], ReplyDone) and events[-1].reason == "length"
        stages = [e.stage for e in events if isinstance(e, Timing)]
        assert stages[-1] == "first_pcm"
        first_pcm = next(i for i, e in enumerate(events) if isinstance(e, Timing) and e.stage == "first_pcm")
        assert first_pcm < next(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
        ids = reply._reply.gen.generated_ids
        values = [i - tok.audio_offset for i in ids if tok.is_audio(i)]
        alone = new_decoder_stream(sched.m.decoder, responder.config)
        expected = np.concatenate([alone.push(values), alone.finish()])
        got = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4)
        await session.close()
    assert {c for batch in gate.batches for c in batch} >= {"order0", "order1", "order2"}


async def test_the_lm_keeps_stepping_while_the_decoder_is_busy(responder, sched, script, gate):
    """A's first block is held inside the decoder; meanwhile the LM generates all of A's text and starts
    and runs B's reply up to its speech."""
    gate.hold()
    a_session, _, a = start(responder, "busy-a")
    assert await gate.next_batch() == ["busy-a"]
    steps = sched.stats()["decode_steps"]
    b_session, _, b = start(responder, "busy-b", "Hello there.")
    await a.until(lambda e, _: a.text() == MESSAGE)
    await b.until(lambda e, _: isinstance(e, Timing) and e.stage == "first_speech_token")
    assert gate.batches == [["busy-a"]]  # the decoder is still in A's first block
    assert not any(isinstance(e, AudioChunk) for e in a.events + b.events)
    assert sched.stats()["decode_steps"] > steps
    gate.open()
    check_complete_reply(await a.done(), script, sched.m.text)
    check_complete_reply(await b.done(), script, sched.m.text)
    await a_session.close()
    await b_session.close()


async def test_cancel_drops_queued_and_running_blocks(responder, sched, script, gate, handovers):
    """A: cancelled after its first audio (its history keeps what was heard). B and C: one batch held in
    the decoder; B is cancelled while it runs, C goes on. D: its first block waits in the queue and is
    cancelled there. Nothing of a cancelled reply comes out after its cancel; every call goes on."""
    tok = sched.m.text
    dropped = sched.stats()["decoder_dropped_blocks"]
    gate.hold()
    a_session, a_reply, a = start(responder, "cut-a")
    assert await gate.next_batch() == ["cut-a"]
    b_session, b_reply, b = start(responder, "cut-b")
    c_session, c_reply, c = start(responder, "cut-c")
    await handovers.handed_over(b_reply._reply, c_reply._reply)
    gate.let_one_go()  # A's first block
    await a.until(is_audio)
    running = await gate.next_batch()
    assert {"cut-b", "cut-c"} <= set(running)  # B and C were queued together: one batch
    d_session, d_reply, d = start(responder, "cut-d")
    await handovers.handed_over(d_reply._reply)  # queued behind the running batch

    played_ms = audio_ms(a.events) * 0.5
    a_mark = len(a.events) + a_reply._events.qsize()  # what was delivered before the cancel
    a_reply.cancel(played_ms=played_ms)
    b_reply.cancel(played_ms=0.0)
    d_reply.cancel(played_ms=0.0)
    for listener in (a, b, d):  # the LM ends them while the decoder still holds B's block
        await listener.until(is_end)
    gate.open()
    check_complete_reply(await c.done(), script, tok)
    a_events, b_events, d_events = await a.done(), await b.done(), await d.done()
    only_end_after(a_events, a_mark - 1)
    for listener in (a, b, d):  # C's audio came after B's result in the same batch: B's would be here
        listener.nothing_after_the_end()
    for events in (b_events, d_events):
        assert [type(e) for e in events if not isinstance(e, Timing | TextDelta)] == [ReplyDone]
        assert events[-1].reason == "cancelled"
    assert d_reply._reply.audio.stream is None  # D's block was dropped from the queue, never decoded
    assert "cut-d" not in {call for batch in gate.batches for call in batch}
    assert sched.stats()["decoder_dropped_blocks"] > dropped
    block = user_turn_ids(tok, text="Hi.")
    assert a_session.dialogue.history.turns[-1] == block + heard_ids(script["reply_ids"], tok, played_ms)
    for session in (a_session, b_session, d_session):
        check_cache_matches_history(session.dialogue)
        session.add_text("Go on.")
        check_complete_reply(await Listener(session.respond()).done(), script, tok)
    for session in (a_session, b_session, c_session, d_session):
        await session.close()


async def test_a_failing_block_fails_only_its_call(responder, sched, script, gate, handovers):
    """F and H are decoded in one batch; F's block raises: F's reply ends in a ReplyError and leaves no
    trace, H and the call before them (W) complete, and F's call goes on."""
    tok = sched.m.text
    gate.hold()
    w_session, _, w = start(responder, "fail-w")
    assert await gate.next_batch() == ["fail-w"]
    f_session, f_reply, f = start(responder, "fail-f")
    h_session, h_reply, h = start(responder, "fail-h")
    await handovers.handed_over(f_reply._reply, h_reply._reply)
    gate.failing.add("fail-f")
    gate.open()
    assert {"fail-f", "fail-h"} <= set(await gate.next_batch())  # queued together: one batch
    check_complete_reply(await w.done(), script, tok)
    check_complete_reply(await h.done(), script, tok)
    f_events = await f.done()
    assert isinstance(f_events[-1], ReplyError) and "injected decoder fault" in f_events[-1].message
    assert not any(isinstance(e, AudioChunk) for e in f_events)
    assert f_session.dialogue.history.turns == []
    check_cache_matches_history(f_session.dialogue)
    gate.failing.clear()
    f_session.add_text("Hi again.")
    check_complete_reply(await Listener(f_session.respond()).done(), script, tok)
    for session in (w_session, f_session, h_session):
        await session.close()


async def test_shutdown_with_blocks_queued(demo_dir, monkeypatch):
    """Stop while one block runs in the decoder and another waits: every reply gets its end event, nothing
    is emitted after it, the running batch finishes and both threads end."""
    r = GLMVoiceResponder(EngineConfig(demo_weights_dir=str(demo_dir), device="cpu"))
    await r.start()
    sched = r.engine.scheduler
    gate = GatedDecoder(sched, sched.decoder.decode_blocks)
    monkeypatch.setattr(sched.decoder, "decode_blocks", gate)
    handovers = Handovers(sched.decoder)
    monkeypatch.setattr(sched.decoder, "submit", handovers)
    gate.hold()
    try:
        _, a_reply, a = start(r, "stop-a")
        assert await gate.next_batch() == ["stop-a"]
        _, b_reply, b = start(r, "stop-b")
        await handovers.handed_over(b_reply._reply)
        stopping = asyncio.get_running_loop().create_task(r.stop())
        await a.until(is_end)
        await b.until(is_end)
    finally:
        gate.open()
    await asyncio.wait_for(stopping, WAIT_S)
    for listener in (a, b):
        events = await listener.done()
        assert sum(is_end(e, events) for e in events) == 1
        assert not any(isinstance(e, AudioChunk) for e in events)
        listener.nothing_after_the_end()
    assert b_reply._reply.audio.stream is None  # the queued block was dropped
    assert not r.engine.alive and not sched.decoder._thread.is_alive()
    assert not r.info().ready


def test_the_worker_batches_the_most_urgent_block_with_no_longer_ones():
    """The worker's batches: first blocks (no audio yet) before any other, oldest reply first; then the
    stream whose playback runs dry soonest, with the queued blocks no longer than its block; never more
    than the bound."""
    import math

    import torch

    from pipeline.engine.decoder_worker import Block, DecoderWorker
    from pipeline.engine.reply import ReplyState

    worker = DecoderWorker(new_stream=None, report=None, device=torch.device("cpu"), max_blocks=3)

    def block(name: str, dry_at_s: float, tokens: int) -> Block:
        reply = ReplyState(name, emit=lambda e: None, sampling=SamplingSettings(), max_new_tokens=1)
        first = dry_at_s == -math.inf
        return Block(reply, (1,) * tokens, finish=False, first_audio=first, dry_at_s=dry_at_s)

    blocks = [block("late", 9.0, 40), block("new1", -math.inf, 10), block("soon", 5.0, 40)]
    blocks += [block("long", 7.0, 80), block("new2", -math.inf, 10), block("new3", -math.inf, 10)]
    blocks += [block("new4", -math.inf, 10)]
    for b in blocks:
        worker.submit(b)
    names = lambda batch: [b.reply.reply_id for b in batch]  # noqa: E731
    assert names(worker._take()) == ["new1", "new2", "new3"]
    assert names(worker._take()) == ["new4"]  # first blocks: the longer blocks wait
    assert names(worker._take()) == ["soon", "late"]  # "long" is more urgent than "late" but longer
    assert names(worker._take()) == ["long"]
    worker.stop(1.0)
    assert worker._take() is None

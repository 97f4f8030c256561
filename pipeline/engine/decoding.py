"""Decoder blocks on the LM thread's side: when a reply's speech values make a block, which replies' blocks
go first, and the hand-over to the decoder worker (pipeline/engine/decoder_worker.py), which decodes them.
Independent of where the tokens came from (token_source.py).
"""

from __future__ import annotations

import math

from pipeline.engine.config import EngineConfig
from pipeline.engine.decoder_worker import Block
from pipeline.engine.dialogue import Dialogue
from pipeline.engine.reply import ReplyState


def block_ready(reply: ReplyState) -> bool:
    """No block of the reply is with the worker, and its speech values make the stream's next block (10,
    then doubling up to `max_block_tokens`), or generation ended and the tail is left."""
    audio = reply.audio
    if audio.in_flight or audio.finished:
        return False
    return len(audio.buffer) >= audio.next_block_tokens or reply.gen.finish_reason is not None


def urgency(reply: ReplyState, now: float) -> tuple[float, float]:
    """Sort key: a reply with no audio yet first, then the stream least ahead of its playback."""
    return (reply.lead_ms(now), reply.time.started_t)


def dry_at_s(reply: ReplyState) -> float:
    """When the reply's playback runs out of audio (monotonic s), -inf before its first PCM: the same order
    as `urgency`, but fixed while the block waits in the worker's queue."""
    first = reply.time.first_pcm_t
    if first is None:
        return -math.inf
    return first + reply.audio.produced_ms() / 1000.0


def blocks_in_order(active: list[Dialogue], cfg: EngineConfig, now: float) -> list[Dialogue]:
    """Calls with a ready block, most urgent first. While a reply still waits for its first audio, a
    stream more than `stream_lead_ms` ahead of its playback waits (time to first audio first)."""
    ready = [
        d for d in active if d.reply.started and not d.reply.cancel_event.is_set() and block_ready(d.reply)
    ]
    ready.sort(key=lambda d: urgency(d.reply, now))
    waiting_first_audio = any(d.reply.started and d.reply.time.first_pcm_t is None for d in active)
    if waiting_first_audio:
        ready = [d for d in ready if d.reply.lead_ms(now) <= cfg.stream_lead_ms]
    return ready


def take_block(reply: ReplyState) -> Block:
    """The reply's buffered speech values (and its tail once generation ended) as the worker's next job."""
    audio = reply.audio
    tokens, audio.buffer = tuple(audio.buffer), []
    finish = reply.gen.finish_reason is not None
    audio.in_flight, audio.finished = True, finish
    audio.tokens_decoded += len(tokens)
    return Block(reply, tokens, finish, first_audio=audio.samples == 0, dry_at_s=dry_at_s(reply))

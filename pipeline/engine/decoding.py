"""Decoder blocks: when a reply's speech values make a block, which replies' blocks go first, and one
block from speech values to emitted PCM. Independent of where the tokens came from (token_source.py).
"""

from __future__ import annotations

import numpy as np

from pipeline.engine.config import EngineConfig
from pipeline.engine.dialogue import Dialogue
from pipeline.engine.reply import ReplyState
from pipeline.responder import AudioChunk, Timing


def block_ready(reply: ReplyState) -> bool:
    """A block waits for as many speech values as the stream's schedule asks next (10, then doubling up to
    `max_block_tokens`); the tail goes as soon as generation ended."""
    return (
        len(reply.audio.buffer) >= reply.audio.stream.tokens_to_next_block
        or reply.gen.finish_reason is not None
    )


def urgency(reply: ReplyState, now: float) -> tuple[float, float]:
    """Sort key: a reply with no audio yet first, then the stream least ahead of its playback."""
    return (reply.lead_ms(now), reply.time.started_t)


def blocks_in_order(active: list[Dialogue], cfg: EngineConfig, now: float) -> list[Dialogue]:
    """Calls with a ready block, most urgent first. While a turn still waits for its first audio, a
    stream more than `stream_lead_ms` ahead of its playback waits (time to first audio first)."""
    ready = [d for d in active if d.reply.started and block_ready(d.reply)]
    ready.sort(key=lambda d: urgency(d.reply, now))
    waiting_first_audio = any(d.reply.started and d.reply.time.first_pcm_t is None for d in active)
    if waiting_first_audio:
        ready = [d for d in ready if d.reply.lead_ms(now) <= cfg.stream_lead_ms]
    return ready


def decode_block(reply: ReplyState) -> None:
    """Decode the buffered speech values (and the stream's tail once generation ended); emit the PCM."""
    audio = reply.audio
    tokens, audio.buffer = audio.buffer, []
    chunks = []
    if tokens:
        chunks.append(audio.stream.push(tokens))
        audio.tokens_decoded += len(tokens)
    if reply.gen.finish_reason is not None:
        chunks.append(audio.stream.finish())
    pcm = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if pcm.size:
        if reply.time.first_pcm_t is None:
            reply.emit(Timing("first_pcm", reply.mark("first_pcm")))
        audio.samples += pcm.size
        reply.emit(AudioChunk(pcm, audio.sample_rate_hz))

"""The decoder worker: a thread of its own that turns ready decoder blocks into PCM, several replies per
batch.

The LM thread (pipeline/engine/scheduler.py) hands over a `Block` per reply whose speech values make a
block (at most one per reply at a time) and goes on stepping; the worker takes every queued block, most
urgent first and at most `max_blocks` per batch, decodes them with one `decode_blocks` call
(pipeline/decoder/batch.py), emits each reply's audio, and reports back to the LM thread with a
`BlockDone` command on the engine's inbox. The two threads meet only at these two queues.

Ownership: a `Block` holds Python ints and the reply (the worker reads its `cancel_event` and `emit`,
both thread-safe); the reply's `DecoderStream` (`reply.audio.stream`) is made and used by this thread
only, so its device tensors live on the worker's CUDA stream and no device tensor crosses a queue; the
PCM comes back from `decode_blocks` on the host and goes to the asyncio side through `emit`.
Cancellation: a reply whose `cancel_event` is set (barge-in, hangup, failure, shutdown) has its queued
block dropped and the result of its running block thrown away; its end event comes from the LM thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.decoder.batch import BlockJob, decode_blocks
from pipeline.decoder.stream import DecoderStream
from pipeline.engine.reply import ReplyState
from pipeline.responder import AudioChunk, Timing

log = logging.getLogger(__name__)
IDLE_WAIT_S = 30.0  # an idle worker wakes on `submit`; the deadline only bounds a lost wake-up
WARM_UP_TIMEOUT_S = 300.0  # the worker's warm-up (graph replays, allocator) should take seconds
DecodeBlocks = Callable[[Sequence[BlockJob]], list]  # decode_blocks' signature (tests put a seam here)


@dataclass(frozen=True)
class Block:
    """One reply's next decoder block, from the LM thread to the worker."""

    reply: ReplyState
    tokens: tuple[int, ...]  # speech values (empty when only the stream's tail is left)
    finish: bool  # generation ended: the stream's tail follows the tokens
    first_audio: bool  # the reply has no audio yet: its first PCM gets the `first_pcm` timing
    dry_at_s: float  # urgency: when the reply's playback runs out (monotonic s); -inf while it has no audio


class BlockSink(Protocol):
    """The LM thread's side of a `BlockDone` (pipeline/engine/scheduler.py)."""

    def block_done(self, done: BlockDone) -> None: ...


@dataclass(frozen=True)
class BlockDone:
    """A block's outcome, from the worker to the LM thread: it travels on the engine's command queue and is
    applied between steps like a command (pipeline/engine/commands.py), which is why it has `apply`."""

    reply: ReplyState
    samples: int = 0  # PCM samples emitted
    first_pcm_t: float | None = None  # when the reply's first PCM was emitted (this block's)
    next_block_tokens: int = 0  # speech values the stream wants for its next block
    finish: bool = False  # the block ended the stream: the reply is complete
    error: Exception | None = None  # the block failed: the reply fails, every other goes on

    def apply(self, s: BlockSink) -> None:
        s.block_done(self)

    def unanswered(self) -> None:
        """The engine stopped first: nobody waits on a block's report."""


class DecoderWorker:
    """A thread with a queue of ready blocks; `submit` from the LM thread, results on the engine's inbox."""

    def __init__(
        self,
        new_stream: Callable[[], DecoderStream],
        report: Callable[[BlockDone], None],
        device: torch.device,
        max_blocks: int,
    ) -> None:
        self.new_stream = new_stream  # a reply's stream, made in this thread on its first block
        self.report = report  # -> the engine's inbox
        self.decode_blocks: DecodeBlocks = decode_blocks
        self.device = device
        self.max_blocks = max_blocks
        self.cpu_threads = torch.get_num_threads()  # the LM thread's setting (pipeline/engine/models.py)
        self.counters = {"decoder_batches": 0, "decoder_batched_blocks": 0, "decoder_dropped_blocks": 0}
        self._queue: list[Block] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._warm_up_tokens = 0
        self._warm = threading.Event()
        self._thread = threading.Thread(target=self._main, name="glm4voice-decoder", daemon=True)

    def start(self, warm_up_tokens: int = 0) -> None:
        """Start the thread. With `warm_up_tokens` it first decodes throwaway blocks of that many speech
        values (one alone, then two as a batch) on its own CUDA stream, and this returns once they are
        done: the allocator's memory for that stream and the first kernels are paid for before the first
        reply, not by it (the engine's warm-up ran on the LM thread's stream)."""
        self._warm_up_tokens = warm_up_tokens
        self._thread.start()
        if warm_up_tokens and not self._warm.wait(WARM_UP_TIMEOUT_S):
            log.warning(
                "decoder worker warm-up did not finish within %.0f s; serving anyway", WARM_UP_TIMEOUT_S
            )

    def submit(self, block: Block) -> None:
        with self._wake:
            self._queue.append(block)
            self._wake.notify()

    def stop(self, timeout_s: float) -> None:
        """Queued blocks are dropped (their replies have ended); a running batch finishes first."""
        with self._wake:
            self._stopping = True
            self._queue.clear()
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("decoder worker did not stop within %.0f s", timeout_s)

    # ----- the thread ---------------------------------------------------------------------------------

    def _main(self) -> None:
        with self._device_stream():
            self._warm_up()
            while True:
                batch = self._take()
                if batch is None:
                    return
                try:
                    self._run(batch)
                except Exception as exc:  # noqa: BLE001 - a bug here fails this batch's replies, not the worker
                    log.exception("decoder batch failed")
                    for block in batch:
                        self.report(BlockDone(block.reply, error=exc))

    def _warm_up(self) -> None:
        t0 = time.monotonic()
        try:
            for rows in (1, 2) if self._warm_up_tokens else ():
                jobs = [BlockJob(self.new_stream(), [0] * self._warm_up_tokens, True) for _ in range(rows)]
                for result in self.decode_blocks(jobs):
                    if isinstance(result, Exception):
                        raise result
            if self._warm_up_tokens:
                log.info("decoder worker warmed up on its own stream in %.2f s", time.monotonic() - t0)
        except Exception:  # noqa: BLE001 - a failed warm-up costs the first reply time, not the worker
            log.exception("decoder worker warm-up failed")
        finally:
            self._warm.set()

    @contextlib.contextmanager
    def _device_stream(self):
        """On CUDA the worker's kernels go on a stream of their own, beside the LM's."""
        if self.device.type != "cuda":
            torch.set_num_threads(self.cpu_threads)  # a per-thread setting in torch's CPU thread pool
            yield
            return
        torch.cuda.set_device(self.device)
        with torch.cuda.stream(torch.cuda.Stream(self.device)):
            yield

    def _take(self) -> list[Block] | None:
        """The next batch: the most urgent block, then the other queued blocks in urgency order that are no
        longer than it, at most `max_blocks`; None once stopping. A batch costs about as much as its longest
        block, so nothing longer rides along with an urgent short one (a first block:
        `first_block_tokens`)."""
        with self._wake:
            while not self._queue and not self._stopping:
                self._wake.wait(IDLE_WAIT_S)
            if self._stopping:
                return None
            self._queue.sort(key=lambda b: (b.dry_at_s, b.reply.time.started_t))
            longest = len(self._queue[0].tokens)
            batch = [b for b in self._queue if len(b.tokens) <= longest][: self.max_blocks]
            self._queue = [b for b in self._queue if all(b is not x for x in batch)]
            return batch

    def _run(self, batch: list[Block]) -> None:
        live = [b for b in batch if not b.reply.cancel_event.is_set()]
        self.counters["decoder_dropped_blocks"] += len(batch) - len(live)
        jobs, decodable = [], []
        for block in live:
            audio = block.reply.audio
            try:
                if audio.stream is None:
                    audio.stream = self.new_stream()
            except Exception as exc:  # noqa: BLE001 - this reply fails alone
                self.report(BlockDone(block.reply, error=exc))
                continue
            jobs.append(BlockJob(audio.stream, list(block.tokens), block.finish))
            decodable.append(block)
        if not jobs:
            return
        results = self.decode_blocks(jobs)
        self.counters["decoder_batches"] += 1
        self.counters["decoder_batched_blocks"] += len(jobs)
        for block, job, result in zip(decodable, jobs, results, strict=True):
            if isinstance(result, Exception):
                self.report(BlockDone(block.reply, error=result))
            elif not block.reply.cancel_event.is_set():  # cancelled while it ran: nothing more goes out
                self._emit(block, job.stream, result)

    def _emit(self, block: Block, stream: DecoderStream, pcm: np.ndarray) -> None:
        reply = block.reply
        first_pcm_t = None
        if pcm.size:
            if block.first_audio:
                first_pcm_t = time.monotonic()
                reply.emit(Timing("first_pcm", first_pcm_t))
            reply.emit(AudioChunk(pcm, reply.audio.sample_rate_hz))
        self.report(
            BlockDone(
                reply,
                samples=int(pcm.size),
                first_pcm_t=first_pcm_t,
                next_block_tokens=0 if block.finish else stream.tokens_to_next_block,
                finish=block.finish,
            )
        )

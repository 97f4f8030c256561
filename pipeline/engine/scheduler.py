"""The engine's LM thread and its work loop: every call's turns, interleaved at token granularity.

One step = cancellations -> new turns' prompts -> one bounded prefill chunk per prompting call -> one
batched next-id step over every generating reply (pipeline/engine/token_source.py) -> ready decoder
blocks handed to the decoder worker (pipeline/engine/decoding.py, decoder_worker.py), which decodes them
on its own thread while the LM steps on -> early prefill when nothing else waits. Priorities (docs/engine.md):
a reply with no audio yet goes first (time to first audio), then the stream whose audio is least ahead of
its playback. A long prompt never stalls the others: it goes in `prefill_chunk_tokens` per step, with
every other call's decode step between. All state of a call lives in its `Dialogue`; an exception in one
call's work (its decoder blocks included) ends that call's reply with a ReplyError and leaves every other
call alone.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

import numpy as np

from pipeline.engine import decoding
from pipeline.engine.config import EngineConfig
from pipeline.engine.decoder_worker import BlockDone, DecoderWorker
from pipeline.engine.dialogue import Dialogue, heard_prefix_len
from pipeline.engine.models import Models, new_decoder_stream
from pipeline.engine.token_source import LocalLM, TokenSource
from pipeline.lm.history import MESSAGE, USER, DialogueHistory, Segment
from pipeline.lm.prompt import StreamParser, system_block_ids, user_block_ids
from pipeline.responder import ReplyDone, ReplyError, TextDelta, Timing
from pipeline.tokenizer.stream import TokenizerStream
from pipeline.transcription.worker import Job, TranscriptionWorker

log = logging.getLogger(__name__)
IDLE_WAIT_S = 30.0  # an idle engine wakes on commands; the deadline only bounds a lost wake-up
DECODER_STOP_S = 10.0  # a running decoder batch finishes before the worker stops


class Scheduler:
    def __init__(
        self,
        cfg: EngineConfig,
        models: Models,
        inbox: queue.SimpleQueue,
        source: TokenSource | None = None,
        transcription: TranscriptionWorker | None = None,
    ) -> None:
        self.cfg = cfg
        self.m = models
        self.inbox = inbox
        self.source: TokenSource = source or LocalLM(models.lm, cfg.prefill_chunk_tokens)
        self.transcription = transcription  # None: transcription is off server-wide
        self.dialogues: list[Dialogue] = []
        self.counters = {"decoder_blocks": 0, "turns_done": 0, "turn_errors": 0}
        self.decoder = DecoderWorker(
            lambda: new_decoder_stream(models.decoder, cfg),
            inbox.put,
            models.decoder.device,
            max_blocks=cfg.max_calls_batched,
        )
        self.running = True

    # ----- loop ---------------------------------------------------------------------------------------

    def start_decoder(self) -> None:
        """The decoder worker's thread, warmed up on its own stream (before the engine reports ready)."""
        self.decoder.start(self.cfg.first_block_tokens)

    def run(self) -> None:
        """Serve until a stop command (the decoder worker was started: `start_decoder`). Waits on the inbox
        only when there is nothing to compute."""
        try:
            self._loop()
        finally:
            self.decoder.stop(DECODER_STOP_S)

    def _loop(self) -> None:
        while self.running:
            try:
                command = self.inbox.get(timeout=IDLE_WAIT_S) if not self.busy() else self.inbox.get_nowait()
            except queue.Empty:
                command = None
            while command is not None and self.running:
                command.apply(self)
                try:
                    command = self.inbox.get_nowait()
                except queue.Empty:
                    command = None
            if not self.running:
                return
            self._note_first_audio()  # a reply just asked for goes first from now, before its prefill
            self.step()

    def busy(self) -> bool:
        return any(self._has_work(d) for d in self.dialogues) or bool(self._blocks_to_hand_over())

    def _has_work(self, d: Dialogue) -> bool:
        """Something to compute now (a ready decoder block counts in `busy`). A reply whose next id is still
        on its way (a remote source) or whose generation ended (its blocks are the worker's) is not."""
        if d.early_prefill_wanted:
            return True
        if d.reply is None:
            return self.source.prefilling(d) and not self.source.waiting(d)
        reply = d.reply
        if reply.cancel_event.is_set() or not reply.started:
            return True
        if self.source.waiting(d):
            return False
        return not reply.gen.prompt_done or reply.generating

    def step(self) -> None:
        for d in self._active():
            if d.reply.cancel_event.is_set():
                self.guarded(d, self.cancel, d)
        for d in self._active():
            if not d.reply.started:
                self.guarded(d, self._start_reply, d)
        for d in self._active():
            if not d.reply.gen.prompt_done:
                self.guarded(d, self._advance_prompt, d)
        self._next_ids()
        self._hand_over_blocks()
        self._note_first_audio()
        if self.inbox.empty():
            for d in self.dialogues:
                if d.reply is None:
                    self.guarded(d, self._early_prefill, d)

    def _note_first_audio(self) -> None:
        """Tell the transcription worker whether any reply still waits for its first audio (it waits too)."""
        if self.transcription is None:
            return
        gate = self.transcription.first_audio_clear
        if any(d.reply is not None and d.reply.time.first_pcm_t is None for d in self.dialogues):
            gate.clear()
        else:
            gate.set()

    def hold_transcription(self) -> None:
        """Pause the transcription worker until the next step says whether a reply waits for first audio."""
        if self.transcription is not None:
            self.transcription.first_audio_clear.clear()

    def transcribe(self, d: Dialogue, key: int, pcm16k: np.ndarray) -> None:
        """A committed spoken turn goes to the transcription worker when the session asked for it."""
        settings = d.settings.transcription
        if self.transcription is None or settings is None or d.emit_transcript is None:
            return
        self.transcription.submit(
            Job(key, pcm16k, settings.language, settings.prompt, d.emit_transcript, lambda: d.closed)
        )

    def _active(self) -> list[Dialogue]:
        return [d for d in self.dialogues if d.reply is not None]

    def guarded(self, d: Dialogue, fn: Callable, *args) -> None:
        """Run one call's work; an exception becomes that call's ReplyError."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - isolate the failing call, keep serving the others
            log.exception(
                "turn failed", extra={"call_id": d.call_id}
            )  # the log shows a hash of the id, never the id
            self.counters["turn_errors"] += 1
            reply = d.reply
            d.abandon_reply()
            if d.history is not None:
                self.source.rewind(d)
            if reply is not None:
                reply.cancel_event.set()  # a block of it still with the decoder worker emits nothing
                reply.emit(ReplyError(f"{type(exc).__name__}: {exc}"))

    # ----- calls --------------------------------------------------------------------------------------

    def open(self, d: Dialogue) -> None:
        d.history = DialogueHistory(self.m.text)
        d.tokenizer_stream = TokenizerStream(self.m.speech_tokenizer)
        self.source.open(d)
        self.dialogues.append(d)

    def close(self, d: Dialogue) -> None:
        reply, d.reply = d.reply, None
        if reply is not None:
            reply.cancel_event.set()
            reply.emit(ReplyDone("cancelled"))
        self.source.close(d)
        d.release()
        if d in self.dialogues:
            self.dialogues.remove(d)

    def shutdown(self) -> None:
        for d in list(self.dialogues):
            self.close(d)
        self.running = False

    # ----- prompts ------------------------------------------------------------------------------------

    def _start_reply(self, d: Dialogue) -> None:
        """The reply's prompt: the history + the pending items + the reply's header, fitted to the context.
        With no user item the system block keeps its input mode; the reply's own instructions, if any,
        stand in the system block for this reply only (the prefix rule re-prefills what follows it)."""
        reply, history = d.reply, d.history
        speech = [item.speech_input for item in reply.items if item.speech_input is not None]
        before = (list(history.system_ids), d.speech_input)
        if speech:
            d.speech_input = speech[-1]
        instructions = d.settings.instructions if reply.instructions is None else reply.instructions
        history.set_system(
            system_block_ids(self.m.text, speech_input=d.speech_input, instructions=instructions)
        )
        reply.gen.segments = [
            history.append(
                Segment(USER if item.speech_input is not None else MESSAGE, item.block_ids, item.key)
            )
            for item in reply.items
        ]
        reply.gen.reply_segment = history.begin_reply(reply.reply_id)
        reply.gen.segments.append(reply.gen.reply_segment)
        context = self._context_tokens()
        reserve = min(reply.max_new_tokens, context // 4)
        # fit() drops old items but never the system block nor this reply's: when even those do not fit
        # (instructions and input each within its own limit, not both), the input is refused before fit()
        # drops anything, and the history is left as it was.
        kept = len(history.system_ids) + sum(len(segment.ids) for segment in reply.gen.segments)
        if kept + reserve > context:
            d.undo_start(reply)
            history.set_system(before[0])
            d.speech_input, d.reply = before[1], None
            reply.emit(
                ReplyError(
                    f"the instructions and this reply's input ({kept} tokens with the system prompt) + "
                    f"{reserve} reserved for the reply do not fit the {context}-token context; the input "
                    "was dropped",
                    code="input_too_large",
                )
            )
            return
        reply.emit(Timing("tokens_ready", reply.time.tokens_ready_t or time.monotonic()))
        history.fit(context, reserve_tokens=reserve, keep_last=len(reply.gen.segments))
        reply.gen.prompt_ids = history.ids()
        reply.gen.parser = StreamParser(self.m.text)
        reply.audio.next_block_tokens = self.cfg.decoder_schedule()[0]  # the stream's first block
        self.source.begin(d, reply.gen.prompt_ids, for_reply=True)

    def _advance_prompt(self, d: Dialogue) -> None:
        reply = d.reply
        if not self.source.advance(d):
            return  # more chunks next step: the other calls' work goes between
        reply.gen.prompt_done = True
        d.turn_prompt_lengths.append(len(reply.gen.prompt_ids))
        reply.emit(Timing("prefill_done", reply.mark("prefill_done")))

    def _early_prefill(self, d: Dialogue) -> None:
        """Prefill the user's already-final speech tokens while they still talk (one chunk per idle step)."""
        if d.early_prefill_wanted:
            d.early_prefill_wanted = False
            prompt = self._partial_prompt(d) if d.partial_audio_tokens else []
            context = self._context_tokens()
            # Only a prompt that the reply's start will keep as it is: one that would need `fit()` to drop old
            # turns (or pass the context) changes from the first dropped turn on, so its prefill now is
            # wasted.
            if prompt and len(prompt) + min(self.cfg.max_new_tokens, context // 4) <= context:
                self.source.begin(d, prompt, for_reply=False)
        if self.source.prefilling(d):
            self.source.advance(d)

    def _partial_prompt(self, d: Dialogue) -> list[int]:
        """The prompt as it will start once the user's speech is committed, up to its last final token."""
        tok = self.m.text
        block = user_block_ids(tok, speech_tokens=d.partial_audio_tokens)
        block = block[: block.index(tok.end_of_audio_id)]  # the speech goes on: stop before <|end_of_audio|>
        system = system_block_ids(tok, speech_input=True, instructions=d.settings.instructions)
        turns = d.history.ids()[len(d.history.system_ids) :]
        return [*system, *turns, *(t for item in d.pending.items for t in item.block_ids), *block]

    def _context_tokens(self) -> int:
        return min(self.cfg.context_tokens, self.source.max_context_tokens)

    # ----- generation ---------------------------------------------------------------------------------

    def _next_ids(self) -> None:
        """One id for every generating reply, most urgent first, at most `max_calls_batched` rows."""
        ready = [
            d
            for d in self._active()
            if d.reply.generating and not d.reply.cancel_event.is_set() and not self.source.waiting(d)
        ]
        if not ready:
            return
        now = time.monotonic()
        ready.sort(key=lambda d: decoding.urgency(d.reply, now))
        batch = ready[: self.cfg.max_calls_batched]
        try:
            ids = self.source.next_ids(batch)
        except Exception:  # noqa: BLE001 - find the call that broke the batch by running them alone
            log.exception("batched token step failed; retrying each call alone")
            for d in batch:
                self.guarded(d, lambda d=d: self._accept(d, self.source.next_ids([d])[0]))
            return
        for d, token_id in zip(batch, ids, strict=True):
            self.guarded(d, self._accept, d, token_id)

    def _accept(self, d: Dialogue, token_id: int) -> None:
        """Route one sampled id: stop, text delta, or speech value for the decoder."""
        reply = d.reply
        gen = reply.gen
        parsed = gen.parser.push(token_id)
        if parsed.text:
            if "first_text_token" not in reply.time.stages:
                reply.emit(Timing("first_text_token", reply.mark("first_text_token")))
            reply.emit(TextDelta(parsed.text))
        if parsed.stop:
            gen.finish_reason, gen.next_id = "stop", None
            return
        gen.generated_ids.append(token_id)
        gen.next_id = token_id
        if parsed.speech is not None:
            if "first_speech_token" not in reply.time.stages:
                reply.emit(Timing("first_speech_token", reply.mark("first_speech_token")))
            reply.audio.buffer.append(parsed.speech)
        full = len(gen.prompt_ids) + len(gen.generated_ids) >= self._context_tokens()
        if len(gen.generated_ids) >= reply.max_new_tokens or full:
            gen.finish_reason, gen.next_id = "length", None

    # ----- audio --------------------------------------------------------------------------------------

    def _blocks_to_hand_over(self) -> list[Dialogue]:
        return decoding.blocks_in_order(self._active(), self.cfg, time.monotonic())

    def _hand_over_blocks(self) -> None:
        """Ready decoder blocks go to the worker's queue, most urgent first; the LM does not wait for them."""
        for d in self._blocks_to_hand_over():
            block = decoding.take_block(d.reply)
            if block.tokens:
                self.counters["decoder_blocks"] += 1
            self.decoder.submit(block)

    def block_done(self, done: BlockDone) -> None:
        """The worker's report on a block: count its audio, then finish or fail the reply, or hand over
        its next block. A reply that ended meanwhile (cancelled, closed, failed) is not touched."""
        d = next((d for d in self.dialogues if d.reply is done.reply), None)
        if d is None:
            return
        reply, audio = done.reply, done.reply.audio
        audio.in_flight = False
        if done.error is not None:
            self.guarded(d, _raise, done.error)
            return
        audio.samples += done.samples
        audio.next_block_tokens = done.next_block_tokens
        if done.first_pcm_t is not None:
            reply.time.stages.setdefault("first_pcm", done.first_pcm_t)
        if done.finish:
            self._finish(d, reply.gen.finish_reason, len(reply.gen.generated_ids))
        else:
            self._hand_over_blocks()

    # ----- end of a reply -----------------------------------------------------------------------------

    def _finish(self, d: Dialogue, reason: str, keep: int) -> None:
        reply = d.reply
        kept_text = [i for i in reply.gen.generated_ids[:keep] if not self.m.text.is_audio(i)]
        d.end_reply(keep)
        self.source.rewind(d)
        self.counters["turns_done"] += 1
        reply.emit(ReplyDone(reason, text=self.m.text.decode(kept_text)))

    def cancel(self, d: Dialogue) -> None:
        """Barge-in: stop now; the history keeps what the user heard (see dialogue.heard_prefix_len).
        The reply's block with the decoder worker (queued or running) emits nothing more.

        Before the prompt is in, nothing was said: the input goes back to pending for the next turn."""
        reply = d.reply
        reply.cancel_event.set()  # set already on a barge-in; a reply replaced by a new one stops here
        if not reply.gen.prompt_done:
            if reply.started:
                d.undo_start(reply)
                self.source.rewind(d)
            d.pending.put_back(reply.items)
            d.reply = None
            reply.emit(ReplyDone("cancelled"))
            return
        if reply.played_ms is None and reply.audio.samples > 0:
            keep = len(reply.gen.generated_ids)  # the caller cannot tell: keep what was generated
        else:
            keep = heard_prefix_len(reply.gen.generated_ids, self.m.text.is_audio, reply.played_ms or 0.0)
        self._finish(d, "cancelled", keep)

    def stats(self) -> dict:
        return {
            "calls": len(self.dialogues),
            **self.counters,
            **self.decoder.counters,
            **self.source.counters,
            **(self.transcription.counters if self.transcription is not None else {}),
        }


def _raise(exc: Exception) -> None:
    raise exc

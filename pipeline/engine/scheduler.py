"""The engine thread's work loop: every call's turns, interleaved at token granularity.

One step = cancellations -> prefill of new turns -> one batched LM decode step over every generating
turn -> decoder blocks that are ready. Priorities (DESIGN.md latency budget): a turn with no audio
yet goes first (time to first audio), then the stream whose audio is least ahead of its playback.
All state of a call lives in its `Dialogue`; an exception in one call's work ends that call's turn
with a TurnError and leaves every other call alone.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.decoder.stream import DecoderStream
from pipeline.engine.config import EngineConfig
from pipeline.engine.dialogue import Dialogue, Reply, UserItem, heard_prefix_len
from pipeline.engine.models import Models
from pipeline.lm.prompt import DialogueHistory, StreamParser
from pipeline.lm.sampling import sample_logits
from pipeline.responder import AudioChunk, TextDelta, Timing, TurnDone, TurnError
from pipeline.tokenizer.stream import TokenizerStream

log = logging.getLogger(__name__)
IDLE_WAIT_S = 30.0  # an idle engine wakes on commands; the deadline only bounds a lost wake-up


class Scheduler:
    def __init__(self, cfg: EngineConfig, models: Models, inbox: queue.SimpleQueue) -> None:
        self.cfg = cfg
        self.m = models
        self.inbox = inbox
        self.dialogues: list[Dialogue] = []
        self.counters = {"decode_steps": 0, "decoded_rows": 0, "prefilled_tokens": 0, "decoder_blocks": 0,
                         "turns_done": 0, "turn_errors": 0}  # fmt: skip
        self.settle_waiters: list = []  # futures resolved when no work is left

    # ----- loop ---------------------------------------------------------------------------------------

    def run(self, apply: Callable[[object], bool]) -> None:
        """Serve until a stop command. Waits on the inbox only when there is nothing to compute."""
        while True:
            try:
                command = self.inbox.get(timeout=IDLE_WAIT_S) if not self.busy() else self.inbox.get_nowait()
            except queue.Empty:
                command = None
            while command is not None:
                if not apply(command):
                    return
                try:
                    command = self.inbox.get_nowait()
                except queue.Empty:
                    command = None
            self.step()
            if self.settle_waiters and not self.busy():
                for done in self.settle_waiters:
                    done.set_result(None)
                self.settle_waiters.clear()

    def busy(self) -> bool:
        return any(d.reply is not None or d.early_prefill_wanted for d in self.dialogues)

    def step(self) -> None:
        for d in self._active():
            if d.reply.cancel_event.is_set():
                self.guarded(d, self._cancel, d)
        for d in self._active():
            if not d.reply.started:
                self.guarded(d, self._start_reply, d)
        self._decode_step()
        self._decode_audio()
        if self.inbox.empty():
            for d in self.dialogues:
                if d.early_prefill_wanted and d.reply is None:
                    self.guarded(d, self._early_prefill, d)

    def _active(self) -> list[Dialogue]:
        return [d for d in self.dialogues if d.reply is not None]

    def _urgency(self, d: Dialogue) -> tuple[float, float]:
        return (d.reply.lead_ms(time.monotonic()), d.reply.started_t)

    def guarded(self, d: Dialogue, fn: Callable, *args) -> None:
        """Run one call's work; an exception becomes that call's TurnError."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - isolate the failing call, keep serving the others
            log.exception("call %s: turn failed", d.call_id, extra={"call_id": d.call_id})
            self.counters["turn_errors"] += 1
            reply = d.reply
            d.abandon_reply()
            if reply is not None:
                reply.emit(TurnError(f"{type(exc).__name__}: {exc}"))

    # ----- commands -----------------------------------------------------------------------------------

    def open(self, d: Dialogue) -> None:
        d.history = DialogueHistory(self.m.text)
        d.cache = self.m.lm.new_cache()
        d.tokenizer_stream = TokenizerStream(self.m.speech_tokenizer)
        self.dialogues.append(d)

    def push_audio(self, d: Dialogue, pcm16k: np.ndarray) -> None:
        if d.closed:
            return
        d.audio_pushed = True
        new_tokens = d.tokenizer_stream.push(pcm16k)
        if new_tokens:
            d.partial_audio_tokens.extend(new_tokens)
            d.early_prefill_wanted = True

    def commit_audio(self, d: Dialogue) -> None:
        if d.closed or not d.audio_pushed:
            return
        d.tokenizer_stream.flush()
        tokens = list(d.tokenizer_stream.tokens)
        d.tokenizer_stream.reset()
        d.partial_audio_tokens.clear()
        d.audio_pushed = False
        d.early_prefill_wanted = False
        d.tokens_ready_t = time.monotonic()
        if tokens:
            d.pending_items.append(UserItem(audio_tokens=tokens))

    def discard_audio(self, d: Dialogue) -> None:
        if d.closed:
            return
        d.tokenizer_stream.reset()
        d.partial_audio_tokens.clear()
        d.audio_pushed = False
        d.early_prefill_wanted = False

    def add_text(self, d: Dialogue, text: str) -> None:
        if not d.closed and text.strip():
            d.pending_items.append(UserItem(text=text))

    def respond(self, d: Dialogue, reply: Reply) -> None:
        if d.closed:
            reply.emit(TurnError("the call is closed", code="call_closed"))
            return
        if d.reply is not None:  # a reply still running: the new turn replaces it
            self.guarded(d, self._cancel, d)
        if not d.pending_items:
            reply.emit(TurnError("no user input to respond to (speak or type first)", code="no_input"))
            return
        reply.items, d.pending_items = d.pending_items, []
        reply.tokens_ready_t = d.tokens_ready_t
        d.tokens_ready_t = None
        reply.sample_rate_hz = self.m.decoder.sample_rate_hz
        d.reply = reply

    def cancel_finished(self, d: Dialogue, reply: Reply) -> None:
        """A cancel that arrives after the reply ended (its audio outlived generation): trim the history.

        A cancel of the running reply is handled by the next step (it sees the flag)."""
        if reply is not d.last_reply or d.reply is not None or reply.played_ms is None:
            return
        d.trim_last_reply(heard_prefix_len(reply.generated_ids, self.m.text.is_audio, reply.played_ms))

    def close(self, d: Dialogue) -> None:
        if d.reply is not None:
            reply = d.reply
            d.reply = None
            reply.emit(TurnDone("cancelled"))
        d.release()
        if d in self.dialogues:
            self.dialogues.remove(d)

    def shutdown(self) -> None:
        for d in list(self.dialogues):
            self.close(d)

    # ----- turn start ---------------------------------------------------------------------------------

    def _add_turns(self, history: DialogueHistory, items: list[UserItem], instructions: str) -> list[int]:
        """Append one user block per pending item; returns the whole prompt (history + new blocks)."""
        for item in items:
            history.start_turn(speech_tokens=item.audio_tokens, text=item.text, instructions=instructions)
        return history.ids()

    def _prefill(self, d: Dialogue) -> Callable[[list[int]], torch.Tensor]:
        def prefill(ids: list[int]) -> torch.Tensor:
            self.counters["prefilled_tokens"] += len(ids)
            return self.m.lm.prefill(d.cache, ids)

        return prefill

    def _early_prefill(self, d: Dialogue) -> None:
        """Prefill the user's already-final speech tokens while they still talk."""
        d.early_prefill_wanted = False
        if not d.partial_audio_tokens:
            return
        shadow = DialogueHistory(self.m.text, list(d.history.system_ids), [list(t) for t in d.history.turns])
        items = [*d.pending_items, UserItem(audio_tokens=list(d.partial_audio_tokens))]
        ids = self._add_turns(shadow, items, d.settings.instructions)
        end = len(ids) - ids[::-1].index(self.m.text.end_of_audio_id) - 1  # stop before <|end_of_audio|>
        d.sync_cache(ids[:end], self._prefill(d))

    def _start_reply(self, d: Dialogue) -> None:
        reply = d.reply
        now = time.monotonic()
        reply.emit(Timing("tokens_ready", reply.tokens_ready_t or now))
        self._add_turns(d.history, reply.items, d.settings.instructions)
        context = min(self.cfg.context_tokens, self.m.lm.max_context_tokens)
        d.history.fit(context, reserve_tokens=min(reply.max_new_tokens, context // 4))
        reply.turns_before = len(d.history.turns) - len(reply.items)
        reply.prompt_ids = d.history.ids()
        before = d.prefilled_tokens
        logits = d.sync_cache(reply.prompt_ids, self._prefill(d))
        if logits is None:  # the whole prompt was cached already: recompute the last position
            d.cache.truncate(len(reply.prompt_ids) - 1)
            logits = d.sync_cache(reply.prompt_ids, self._prefill(d))
        d.turn_prefilled_tokens.append(d.prefilled_tokens - before)
        d.turn_prompt_lengths.append(len(reply.prompt_ids))
        reply.emit(Timing("prefill_done", reply.mark("prefill_done")))
        reply.parser = StreamParser(self.m.text)
        reply.decoder_stream = DecoderStream(self.m.decoder, schedule=(self.cfg.first_block_tokens, self.cfg.block_tokens))
        reply.generator = torch.Generator(device=logits.device)
        reply.generator.manual_seed(int(time.monotonic_ns()) & 0x7FFFFFFF)
        self._accept(d, self._sample(reply, logits[None]))

    # ----- generation ---------------------------------------------------------------------------------

    def _sample(self, reply: Reply, logits: torch.Tensor) -> int:
        s = reply.sampling
        return int(sample_logits(logits, s.temperature, s.top_p, s.top_k, reply.generator)[0])

    def _accept(self, d: Dialogue, token_id: int) -> None:
        """Route one sampled id: stop, text delta, or speech value for the decoder."""
        reply = d.reply
        parsed = reply.parser.push(token_id)
        if parsed.text and "first_text_token" not in reply.stage_times:
            reply.emit(Timing("first_text_token", reply.mark("first_text_token")))
        if parsed.text:
            reply.text_parts.append(parsed.text)
            reply.emit(TextDelta(parsed.text))
        if parsed.stop:
            reply.finish_reason, reply.next_id = "stop", None
            return
        reply.generated_ids.append(token_id)
        reply.next_id = token_id
        if parsed.speech is not None:
            if "first_speech_token" not in reply.stage_times:
                reply.emit(Timing("first_speech_token", reply.mark("first_speech_token")))
            reply.speech_buffer.append(parsed.speech)
        full = d.cache.length + 1 >= min(self.cfg.context_tokens, self.m.lm.max_context_tokens)
        if len(reply.generated_ids) >= reply.max_new_tokens or full:
            reply.finish_reason, reply.next_id = "length", None

    def _decode_step(self) -> None:
        ready = [d for d in self._active() if d.reply.generating and not d.reply.cancel_event.is_set()]
        if not ready:
            return
        ready.sort(key=self._urgency)
        batch = ready[: self.cfg.max_calls_batched]
        try:
            logits = self.m.lm.decode_step([d.cache for d in batch], [d.reply.next_id for d in batch])  # (B, V)
        except Exception:  # noqa: BLE001 - find the call that broke the batch by running them alone
            log.exception("batched decode step failed; retrying each call alone")
            for d in batch:
                self.guarded(d, self._decode_one, d)
            return
        self.counters["decode_steps"] += 1
        self.counters["decoded_rows"] += len(batch)
        for row, d in enumerate(batch):
            self.guarded(d, lambda d=d, row=row: self._accept(d, self._sample(d.reply, logits[row : row + 1])))

    def _decode_one(self, d: Dialogue) -> None:
        logits = self.m.lm.decode_step([d.cache], [d.reply.next_id])
        self._accept(d, self._sample(d.reply, logits))

    # ----- audio --------------------------------------------------------------------------------------

    def _block_ready(self, reply: Reply) -> bool:
        need = self.cfg.first_block_tokens if reply.speech_tokens_decoded == 0 else self.cfg.block_tokens
        return len(reply.speech_buffer) >= need or reply.finish_reason is not None

    def _decode_audio(self) -> None:
        """Ready decoder blocks, most urgent first. While a turn still waits for its first audio, a
        stream that is more than `stream_lead_ms` ahead of its playback waits (time to first audio)."""
        active = self._active()
        ready = [d for d in active if d.reply.started and self._block_ready(d.reply)]
        ready.sort(key=self._urgency)
        waiting_first_audio = any(d.reply.started and d.reply.first_pcm_t is None for d in active)
        now = time.monotonic()
        for d in ready:
            if d.reply is None or d.reply.cancel_event.is_set():
                continue
            if waiting_first_audio and d.reply.lead_ms(now) > self.cfg.stream_lead_ms:
                continue
            self.guarded(d, self._decode_block, d)
            if not self.inbox.empty():  # a new turn or a cancel waits: let the next step see it
                return

    def _decode_block(self, d: Dialogue) -> None:
        """Decode the reply's buffered tokens, emit the audio, and finish the reply when generation ended."""
        reply = d.reply
        tokens, reply.speech_buffer = reply.speech_buffer, []
        chunks = []
        if tokens:
            chunks.append(reply.decoder_stream.push(tokens))
            reply.speech_tokens_decoded += len(tokens)
            self.counters["decoder_blocks"] += 1
        if reply.finish_reason is not None:
            chunks.append(reply.decoder_stream.finish())
        pcm = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        if pcm.size:
            if reply.first_pcm_t is None:
                reply.first_pcm_t = reply.mark("first_pcm")
                reply.emit(Timing("first_pcm", reply.first_pcm_t))
            reply.audio_samples += pcm.size
            reply.emit(AudioChunk(pcm, reply.sample_rate_hz))
        if reply.finish_reason is not None:
            self._finish(d, reply.finish_reason, len(reply.generated_ids))

    # ----- end of a reply -----------------------------------------------------------------------------

    def _finish(self, d: Dialogue, reason: str, keep: int) -> None:
        reply = d.reply
        kept_text = [i for i in reply.generated_ids[:keep] if not self.m.text.is_audio(i)]
        d.end_reply(keep)
        self.counters["turns_done"] += 1
        reply.emit(TurnDone(reason, text=self.m.text.decode(kept_text)))

    def _cancel(self, d: Dialogue) -> None:
        """Barge-in: stop now; the history keeps what the user heard (see dialogue.heard_prefix_len)."""
        reply = d.reply
        if not reply.started:
            d.pending_items = reply.items + d.pending_items  # unanswered input stays for the next turn
            d.reply = None
            reply.emit(TurnDone("cancelled"))
            return
        if reply.played_ms is None and reply.audio_samples > 0:
            keep = len(reply.generated_ids)  # the caller cannot tell: keep what was generated
        else:
            keep = heard_prefix_len(reply.generated_ids, self.m.text.is_audio, reply.played_ms or 0.0)
        self._finish(d, "cancelled", keep)

    def stats(self) -> dict:
        return {"calls": len(self.dialogues), **self.counters}

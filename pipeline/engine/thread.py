"""The GLM-4-Voice responder: the engine's LM thread owns the models and serves every call; its decoder
worker thread turns ready decoder blocks into audio beside it (docs/engine.md).

Calls talk to the engine through one command queue (`queue.SimpleQueue`, never blocking the asyncio
loop); the engine answers through each reply's asyncio queue with `loop.call_soon_threadsafe`. The
LM thread waits on its queue when idle and otherwise loops over steps (pipeline.engine.scheduler):

    commands -> cancellations -> new turns' prompts, one bounded prefill chunk per call
             -> ONE batched next-id step -> ready decoder blocks to the worker -> early prefill when idle

so turns of different calls interleave at token granularity and share one forward pass, a new turn's
prefill and first decoder block go before older turns' work (time to first audio first), and older
streams are ordered by how far their audio is ahead of playback. Commands (pipeline/engine/commands.py)
carry their own handlers; the decoder worker reports each block on the same queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import numpy as np

from pipeline.audio_format import DECODER_RATE_HZ
from pipeline.engine.commands import (
    ENGINE_STOPPED,
    AddText,
    Cancel,
    Close,
    Command,
    Commit,
    DeleteItem,
    Discard,
    Open,
    PushAudio,
    Respond,
    Stop,
    Update,
    Wake,
)
from pipeline.engine.config import EngineConfig, VLLMConfig
from pipeline.engine.dialogue import Dialogue, PendingInput, heard_prefix_len
from pipeline.engine.reply import ReplyState
from pipeline.responder import (
    MESSAGE_ROLES,
    START,
    Reply,
    ReplyDone,
    ReplyError,
    ReplyEvent,
    ReplyOptions,
    Responder,
    ResponderInfo,
    ResponderSession,
    SessionSettings,
    TranscriptEvent,
)
from pipeline.transcription.config import TranscriptionConfig

if TYPE_CHECKING:
    from pipeline.engine.scheduler import Scheduler
    from pipeline.engine.vllm_source import VLLMHealth

log = logging.getLogger(__name__)


# ----- asyncio-side objects ---------------------------------------------------------------------------


def _deliver(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, cancelled: threading.Event):
    """A thread-safe `emit` into one reply's asyncio queue (dropped if the loop is gone). Once the reply is
    cancelled only its end event goes in: `cancel()` runs on the loop, so no audio, text or timing of
    the reply reaches the queue after it, whichever engine thread made it and when."""

    def put(event: ReplyEvent) -> None:
        if not cancelled.is_set() or isinstance(event, ReplyDone | ReplyError):
            events.put_nowait(event)

    def emit(event: ReplyEvent) -> None:
        try:
            loop.call_soon_threadsafe(put, event)
        except RuntimeError:  # loop closed: the call is gone, nobody reads this turn any more
            pass

    return emit


def _deliver_transcripts(loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
    """A thread-safe `emit` into a session's transcript queue (dropped if the loop is gone)."""

    def emit(event: TranscriptEvent) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # loop closed: the call is gone
            pass

    return emit


class EngineReply(Reply):
    def __init__(
        self,
        dialogue: Dialogue,
        reply: ReplyState,
        events: asyncio.Queue,
        send: Callable,
        text: Callable[[], object],
    ) -> None:
        self.reply_id = reply.reply_id
        self._dialogue = dialogue
        self._reply = reply
        self._events = events
        self._send = send
        self._text = text  # -> the engine's text tokenizer (is_audio, decode), loaded in the thread

    async def events(self) -> AsyncIterator[ReplyEvent]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, ReplyDone | ReplyError):
                return

    def cancel(self, played_ms: float | None = None) -> None:
        reply = self._reply
        if reply.cancel_event.is_set():  # only a shorter report of what was heard cuts again (truncate)
            if played_ms is None or (reply.played_ms is not None and played_ms >= reply.played_ms):
                return
        reply.played_ms = played_ms  # written before the event is set: the engine reads it after
        reply.cancel_event.set()
        self._send(Cancel(self._dialogue, reply))

    def heard_transcript(self, played_ms: float) -> str | None:
        """Read once ReplyDone has arrived: the engine no longer appends to `generated_ids`."""
        text = self._text()
        ids = list(self._reply.gen.generated_ids)
        keep = heard_prefix_len(ids, text.is_audio, played_ms)
        return text.decode([i for i in ids[:keep] if not text.is_audio(i)])


class EngineSession(ResponderSession):
    def __init__(self, engine: EngineThread, dialogue: Dialogue, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._dialogue = dialogue
        self._loop = loop
        self._settings = dialogue.settings
        self._reply_count = itertools.count(1)
        self._items = itertools.count()  # each commit_audio / add_text / add_message is the next item
        self._current: EngineReply | None = None
        self._transcripts: asyncio.Queue = asyncio.Queue()
        dialogue.emit_transcript = _deliver_transcripts(loop, self._transcripts)  # before the engine opens it

    @property
    def dialogue(self) -> Dialogue:
        """The engine-side state (tests and metrics read it; only the engine thread writes it)."""
        return self._dialogue

    def update(self, settings: SessionSettings) -> None:
        self._settings = settings
        self._engine.send(Update(self._dialogue, settings))

    def push_audio(self, pcm16k: np.ndarray) -> None:
        """Non-finite samples become 0 and the rest is clipped to [-1, 1] (the range the tokenizer saw)."""
        pcm = np.asarray(pcm16k, dtype=np.float32)
        pcm = np.clip(np.nan_to_num(pcm, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)  # a new array
        self._engine.send(PushAudio(self._dialogue, pcm))

    def commit_audio(self) -> None:
        self._engine.send(Commit(self._dialogue, next(self._items)))

    def discard_audio(self) -> None:
        self._engine.send(Discard(self._dialogue))

    def add_text(self, text: str) -> None:
        self._engine.send(AddText(self._dialogue, text, next(self._items)))

    def add_message(self, role: str, text: str, after: int | Reply | str | None = None) -> None:
        if role not in MESSAGE_ROLES:
            raise ValueError(f"unknown role {role!r}")
        if isinstance(after, EngineReply):
            after = after.reply_id  # its segment in the history is named by the reply's id
        elif not (after is None or after == START or isinstance(after, int)):
            raise TypeError(f"not an item of this session: {after!r}")
        key = next(self._items)
        at_start = after == START
        self._engine.send(
            AddText(self._dialogue, text, key, role, None if at_start else after, at_start=at_start)
        )

    def delete_item(self, item: int | Reply) -> None:
        if isinstance(item, EngineReply):
            self._engine.send(DeleteItem(self._dialogue, reply=item._reply))
        elif isinstance(item, int):
            self._engine.send(DeleteItem(self._dialogue, item_key=item))
        else:
            raise TypeError(f"not an item of this session: {item!r}")

    def respond(self, options: ReplyOptions | None = None) -> Reply:
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        sampling = self._settings.sampling
        cfg = self._engine.config
        reply = ReplyState(
            reply_id=f"{self._dialogue.call_id}-reply{next(self._reply_count)}",
            emit=_deliver(self._loop, events, cancelled),
            sampling=sampling,
            max_new_tokens=max(1, min(sampling.max_new_tokens, cfg.max_new_tokens)),
            instructions=None if options is None else options.instructions,
            cancel_event=cancelled,
        )
        self._current = EngineReply(
            self._dialogue, reply, events, self._engine.send, lambda: self._engine.scheduler.m.text
        )
        self._engine.send(Respond(self._dialogue, reply))
        return self._current

    async def transcripts(self) -> AsyncIterator[TranscriptEvent]:
        while (event := await self._transcripts.get()) is not None:
            yield event

    async def close(self) -> None:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._engine.send(Close(self._dialogue, done))
        if self._engine.alive:
            await asyncio.wrap_future(done)
        self._transcripts.put_nowait(None)  # the stream ends: the worker drops a closed call's jobs


class EngineThread:
    """The thread that owns the models; `send()` is the only way in."""

    def __init__(
        self,
        config: EngineConfig,
        vllm: VLLMConfig | None = None,
        health: VLLMHealth | None = None,
        transcription: TranscriptionConfig | None = None,
    ) -> None:
        self.config = config
        self.transcription = transcription  # [transcription]; None: off
        self.vllm, self.health = vllm, health  # set when the LM is served by vLLM (lm_backend = "vllm")
        self.on_crash: Callable[[str], None] | None = None  # called from this thread if the work loop dies
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, name="glm4voice-engine", daemon=True)
        self.scheduler: Scheduler | None = None  # built in the thread
        self.load_error: BaseException | None = None
        self.crash: BaseException | None = None  # what ended the work loop, if it did not stop on request
        self._finished = False  # set by the thread before it answers its last commands

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    @property
    def finished(self) -> bool:
        """The work loop has ended (stopped or crashed); commands are only answered, never run."""
        return self._finished

    def send(self, command: Command) -> None:
        self._inbox.put(command)
        if self._finished:  # nobody will run it: answer it now (close, respond)
            self._answer_leftovers()

    def start(self) -> concurrent.futures.Future:
        self._thread.start()
        return self._ready

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _main(self) -> None:
        from pipeline.engine.models import describe, load_models, warm_up
        from pipeline.engine.scheduler import Scheduler
        from pipeline.transcription.worker import TranscriptionWorker

        worker = None
        try:
            models = load_models(self.config, self.transcription)
            warm_up(models, self.config)
            source = None
            if self.health is not None:
                from pipeline.engine.vllm_source import VLLMSource

                source = VLLMSource(
                    self.config,
                    self.vllm,
                    self.health,
                    sorted(models.text.stop_ids),
                    wake=lambda: self._inbox.put(Wake()),
                )
            if models.transcriber is not None:
                worker = TranscriptionWorker(models.transcriber, threading.Event())
            self.scheduler = Scheduler(self.config, models, self._inbox, source, worker)
            self.scheduler.start_decoder()
        except BaseException as exc:  # reported to start(); the thread ends
            self.load_error = exc
            self._ready.set_exception(exc)
            return
        if worker is not None:
            worker.start()
        self._ready.set_result(describe(models))
        try:
            self.scheduler.run()
        except BaseException as exc:
            self.crash = exc
            log.exception("engine thread crashed")
            self._fail_active_turns()
            if self.on_crash is not None:
                self.on_crash(f"the engine thread died: {type(exc).__name__}: {exc}")
            raise
        finally:
            self._finished = True  # before the drain: a command put after it is answered by send()
            self._answer_leftovers()
            if worker is not None:
                worker.stop()

    def _fail_active_turns(self) -> None:
        """The loop died: every reply in progress ends with an error instead of waiting forever."""
        for d in list(self.scheduler.dialogues):
            reply, d.reply = d.reply, None
            if reply is not None:
                reply.cancel_event.set()
                reply.emit(ENGINE_STOPPED)

    def _answer_leftovers(self) -> None:
        """After the loop ended: nobody may wait forever on a command the engine will never run."""
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            command.unanswered()


class GLMVoiceResponder(Responder):
    """`pipeline.responder.Responder` backed by the engine thread."""

    def __init__(
        self,
        config: EngineConfig,
        vllm: VLLMConfig | None = None,
        transcription: TranscriptionConfig | None = None,
    ) -> None:
        self.config = config
        self.vllm = vllm or VLLMConfig()
        self.transcription = transcription or TranscriptionConfig()
        self.health: VLLMHealth | None = None  # the vLLM deployment's readiness (lm_backend = "vllm")
        self._engine = EngineThread(config, transcription=self.transcription)
        self._details: dict = {"weights": "loading"}
        self._ready = False
        self._on_failure: Callable[[str], None] | None = None

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """The server's hook: `callback(reason)` on the loop when the engine thread dies. Only a dead
        engine ends the calls; vLLM going away fails the replies that needed it and flips `info().ready`."""
        loop = asyncio.get_running_loop()
        self._on_failure = callback

        def push(reason: str) -> None:
            try:
                loop.call_soon_threadsafe(callback, reason)
            except RuntimeError:  # the loop is gone
                pass

        self._push_failure = push
        self._engine.on_crash = push

    @property
    def engine(self) -> EngineThread:
        return self._engine

    async def start(self) -> None:
        if self._ready:
            return
        if self.config.lm_backend == "vllm" and self.health is None:
            from pipeline.engine.vllm_source import VLLMHealth
            from pipeline.lm.vllm_client import VLLMClient

            v = self.vllm
            client = VLLMClient(
                v.url,
                model=v.model,
                api_key=v.api_key,
                connect_timeout_s=v.connect_timeout_s,
                read_timeout_s=v.read_timeout_s,
            )
            self.health = VLLMHealth(client, self.config.context_tokens, v.probe_interval_s)
            self.health.start()  # probes while the local stages load
        if self._engine.started or self.health is not None:  # a fresh thread (re)loads the models
            self._engine = EngineThread(self.config, self.vllm, self.health, self.transcription)
            if self._on_failure is not None:
                self._engine.on_crash = self._push_failure
        self._details = await asyncio.wrap_future(self._engine.start())
        self._ready = True
        log.info("glm4voice engine ready: %s", self._details)

    def open_session(self, call_id: str, settings: SessionSettings) -> ResponderSession:
        if not self._ready:
            raise RuntimeError("the GLM-4-Voice engine is not ready (start() has not finished)")
        cfg = self.config
        dialogue = Dialogue(call_id, settings, PendingInput(cfg.max_pending_items, cfg.max_pending_tokens))
        session = EngineSession(self._engine, dialogue, asyncio.get_running_loop())
        self._engine.send(Open(dialogue))
        return session

    def info(self) -> ResponderInfo:
        rate = self._details.get("output_sample_rate_hz", DECODER_RATE_HZ)
        details = dict(self._details)
        engine = self._engine
        if engine.load_error is not None:
            details["error"] = str(engine.load_error)
        alive = engine.alive and not engine.finished
        if self._ready and not alive:
            crash = engine.crash
            details["error"] = "the engine thread died" + (
                f": {type(crash).__name__}: {crash}" if crash else ""
            )
        if engine.scheduler is not None:
            details.update(engine.scheduler.stats())
        lm_ready = True
        if self.health is not None:
            details["lm_backend"] = f"vllm at {self.vllm.url}"
            lm_ready = self.health.ready
            if not lm_ready and "error" not in details:
                details["error"] = f"the LM server is not ready: {self.health.reason}"
        return ResponderInfo(
            name="glm4voice",
            ready=self._ready and alive and lm_ready,
            output_sample_rate_hz=rate,
            details=details,
        )

    async def stop(self) -> None:
        self._ready = False
        if self.health is not None:
            self.health.stop()
            self.health = None
        if not self._engine.alive:
            return
        self._engine.send(Stop())
        deadline_s = 10.0
        await asyncio.get_running_loop().run_in_executor(None, self._engine.join, deadline_s)
        if self._engine.alive:
            log.warning("engine thread did not stop within %.0f s", deadline_s)

"""The transcription worker: its own thread beside the engine thread, one committed spoken turn at a time.

The engine thread only hands a job over (`submit`, never blocks); the model runs here, so a transcript
never takes a step from the LM's loop. On a shared device it still takes a share of the compute, so a job
starts, and after each of its tokens goes on, only while no reply of any call is waiting for its first
audio (the engine sets `first_audio_clear` after every step); each such wait lasts `FIRST_AUDIO_WAIT_S` at
most, so a transcript is never starved. On CUDA the worker runs on its own stream. Jobs of a closed call
are dropped, and a running one stops at its next token. A failure is that item's `TranscriptFailed`; the
worker and the call go on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from pipeline.responder import TranscriptDelta, TranscriptDone, TranscriptEvent, TranscriptFailed
from pipeline.transcription.model import Stopped, Transcript

log = logging.getLogger(__name__)

# A job waits at most this long for replies' first audio before it takes its share of the device: replies
# reach first audio in well under a second when the device keeps up (docs/transcription.md).
FIRST_AUDIO_WAIT_S = 2.0


class Transcriber(Protocol):
    """What the worker runs (`pipeline.transcription.model.Whisper`; tests put a controllable one here)."""

    name: str
    device: torch.device

    def transcribe(
        self,
        pcm16k: np.ndarray,
        *,
        language: str,
        prompt: str,
        on_text: Callable[[str], None],
        stop: Callable[[], bool],
    ) -> Transcript: ...


@dataclass
class Job:
    item: int  # the user item's index in its session
    pcm16k: np.ndarray  # (samples,) float32, the whole committed turn
    language: str
    prompt: str
    emit: Callable[[TranscriptEvent], None]  # thread-safe, into the session's transcript stream
    closed: Callable[[], bool]  # the call hung up: nothing more is due
    emitted: str = field(default="")  # the text the deltas have carried so far

    def show(self, text: str) -> None:
        """New text so far: the part not yet sent goes out as a delta."""
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.emit(TranscriptDelta(self.item, text[len(self.emitted) :]))
            self.emitted = text


class TranscriptionWorker:
    def __init__(self, model: Transcriber, first_audio_clear: threading.Event) -> None:
        self.model = model
        self.first_audio_clear = first_audio_clear
        self.counters = {"transcripts_done": 0, "transcripts_failed": 0}
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="glm4voice-transcription", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout_s)

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _main(self) -> None:
        device = self.model.device
        stream = None
        if device.type == "cuda":
            torch.cuda.set_device(device)
            stream = torch.cuda.Stream(device)  # not the engine's: its kernels never queue behind ours
        with torch.cuda.stream(stream):  # None (CPU): no stream change
            while (job := self._jobs.get()) is not None:
                if not job.closed():
                    self._run(job)

    def _between_tokens(self, job: Job) -> bool:
        """Before the job and after each token: yield to replies waiting for first audio; True = stop."""
        self.first_audio_clear.wait(FIRST_AUDIO_WAIT_S)
        return job.closed()

    def _run(self, job: Job) -> None:
        try:
            if self._between_tokens(job):
                return
            result = self.model.transcribe(
                job.pcm16k,
                language=job.language,
                prompt=job.prompt,
                on_text=job.show,
                stop=lambda: self._between_tokens(job),
            )
        except Stopped:
            return
        except Exception as exc:  # noqa: BLE001 - one item fails, the worker serves the next
            log.exception("transcription failed")
            self.counters["transcripts_failed"] += 1
            if not job.closed():
                job.emit(TranscriptFailed(job.item, f"{type(exc).__name__}: {exc}"))
            return
        if job.closed():
            return
        job.show(result.text)
        self.counters["transcripts_done"] += 1
        job.emit(TranscriptDone(job.item, result.text, result.language, result.audio_ms))

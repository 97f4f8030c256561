"""The echo responder: a real diagnostic mode ("mic check") with no models.

After each spoken turn it says so in text and plays the turn's audio back as the server heard it
(16 kHz, after VAD and prefix padding), so a user can check their microphone, the network path and
turn-taking before loading GLM-4-Voice. A typed message is answered in text only. Barge-in is honoured
like any responder: the history keeps only the part of a reply that was played.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from pipeline.audio_format import MODEL_INPUT_RATE_HZ
from pipeline.responder import (
    START,
    AudioChunk,
    Reply,
    ReplyDone,
    ReplyEvent,
    ReplyOptions,
    Responder,
    ResponderInfo,
    ResponderSession,
    SessionSettings,
    TextDelta,
    Timing,
)

CHUNK_SAMPLES = 1_600  # 100 ms of 16 kHz audio per AudioChunk, as a streaming decoder would deliver
_reply_ids = itertools.count(1)


@dataclass
class HistoryEntry:
    role: str  # "user" | "assistant" | "system" | "developer"
    text: str
    audio_ms: float  # user: what was heard; assistant: what was played
    key: int | None = None  # a message item: the session's index of the item (`delete_item`); a reply: None


class EchoReply(Reply):
    def __init__(self, session: EchoSession, pending: list[np.ndarray | str]) -> None:
        self.reply_id = f"echo_{next(_reply_ids)}"
        self._session = session
        self._pending = pending
        self._cancelled = asyncio.Event()
        self._played_ms: float | None = None
        self._entry: HistoryEntry | None = None  # set once the reply is in the history
        self.deleted = False  # delete_item: the reply leaves (or never enters) the history

    def cancel(self, played_ms: float | None = None) -> None:
        """Also valid after the reply finished generating: playback may still be cut short."""
        self._played_ms = played_ms
        self._cancelled.set()
        if self._entry is not None and played_ms is not None:
            self._entry.audio_ms = min(self._entry.audio_ms, played_ms)

    async def events(self) -> AsyncIterator[ReplyEvent]:
        audio = [p for p in self._pending if isinstance(p, np.ndarray)]
        texts = [p for p in self._pending if isinstance(p, str)]
        pcm = np.concatenate(audio) if audio else np.zeros(0, np.float32)
        reply_ms = pcm.size * 1000.0 / MODEL_INPUT_RATE_HZ
        if pcm.size:
            text = f"Mic check: I heard {reply_ms / 1000:.1f} s of speech. Playing it back."
        elif texts:
            text = f"Mic check: you typed \u201c{' '.join(texts)}\u201d."
        else:
            text = "Mic check: there is nothing to play back yet. Say something."
        yield Timing("tokens_ready", time.monotonic())
        for i, word in enumerate(text.split(" ")):
            if self._cancelled.is_set():
                break
            yield TextDelta(word if i == 0 else " " + word)
        for start in range(0, pcm.size, CHUNK_SAMPLES):
            if self._cancelled.is_set():
                break
            if start == 0:
                yield Timing("first_pcm", time.monotonic())
            yield AudioChunk(pcm[start : start + CHUNK_SAMPLES].copy(), MODEL_INPUT_RATE_HZ)
            await asyncio.sleep(0)  # let a cancel in between chunks land
        cancelled = self._cancelled.is_set()
        self._entry = HistoryEntry(
            "assistant", text, min(self._played_ms or 0.0, reply_ms) if cancelled else reply_ms
        )
        if not self.deleted:
            self._session.history.append(self._entry)
        yield ReplyDone("cancelled" if cancelled else "stop", text)


@dataclass
class EchoSession(ResponderSession):
    call_id: str
    settings: SessionSettings
    history: list[HistoryEntry] = field(default_factory=list)
    _audio: list[np.ndarray] = field(default_factory=list)  # pushed, not committed
    _pending: list[tuple[int, np.ndarray | str]] = field(default_factory=list)  # (key, item) awaiting a reply
    _user_items: int = 0  # each commit_audio / add_text / add_message is the next item (its key)
    closed: bool = False

    def update(self, settings: SessionSettings) -> None:
        self.settings = settings

    def push_audio(self, pcm16k: np.ndarray) -> None:
        self._audio.append(np.asarray(pcm16k, np.float32))

    def _next_key(self) -> int:
        self._user_items += 1
        return self._user_items - 1

    def commit_audio(self) -> None:
        key = self._next_key()
        if self._audio:
            pcm = np.concatenate(self._audio)
            self._pending.append((key, pcm))
            self.history.append(HistoryEntry("user", "", pcm.size * 1000.0 / MODEL_INPUT_RATE_HZ, key))
        self._audio = []

    def discard_audio(self) -> None:
        self._audio = []

    def add_text(self, text: str) -> None:
        key = self._next_key()
        self._pending.append((key, text))
        self.history.append(HistoryEntry("user", text, 0.0, key))

    def add_message(self, role: str, text: str, after: int | Reply | str | None = None) -> None:
        """Every role is kept in the history at its place; only user text is echoed (by the next reply)."""
        key = self._next_key()
        if role == "user":
            self._pending.append((key, text))
        if after is None:
            index = len(self.history)
        elif after == START:
            index = 0
        else:  # right after that item (a reply by its entry); one no longer here: at the end
            match = (
                (lambda e: e is after._entry) if isinstance(after, EchoReply) else (lambda e: e.key == after)
            )
            index = next((i + 1 for i, e in enumerate(self.history) if match(e)), len(self.history))
        self.history.insert(index, HistoryEntry(role, text, 0.0, key))

    def delete_item(self, item: int | Reply) -> None:
        if isinstance(item, EchoReply):
            item.deleted = True
            self.history = [e for e in self.history if e is not item._entry]
        elif isinstance(item, int):
            self._pending = [(key, p) for key, p in self._pending if key != item]
            self.history = [e for e in self.history if e.key != item]
        else:
            raise TypeError(f"not an item of this session: {item!r}")

    def respond(self, options: ReplyOptions | None = None) -> Reply:
        """Echo has nothing to instruct: `options` change nothing."""
        pending, self._pending = self._pending, []
        return EchoReply(self, [p for _, p in pending])

    async def close(self) -> None:
        self.closed = True
        self._audio = []
        self._pending = []


class EchoResponder(Responder):
    def __init__(self) -> None:
        self.sessions_opened = 0

    async def start(self) -> None:
        return None

    def open_session(self, call_id: str, settings: SessionSettings) -> ResponderSession:
        self.sessions_opened += 1
        return EchoSession(call_id, settings)

    def info(self) -> ResponderInfo:
        return ResponderInfo(
            name="echo",
            ready=True,
            output_sample_rate_hz=MODEL_INPUT_RATE_HZ,
            details={"weights": "none", "mode": "mic check"},
        )

    async def stop(self) -> None:
        return None

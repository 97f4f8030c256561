"""The one interface between the WebRTC edge (`server/`) and whatever answers a call.

The server never imports torch: it hands a responder 16 kHz mono float32 PCM and text, and reads back
events carrying text deltas and PCM at the responder's own rate. A responder runs its model code off
the asyncio loop (an engine thread) and delivers events into the loop thread-safely.

Flow of one user turn and its reply, as the server drives it:

    session = responder.open_session(call_id, settings)        # once per call
    session.push_audio(pcm16k)   ...                            # while the user speaks (VAD says speech)
    session.commit_audio()                                      # VAD: turn ended -> user item is final
    reply = session.respond()                                   # start the assistant's reply
    async for event in reply.events(): ...                      # ReplyEvent: text/audio/timing/done/error
    reply.cancel(played_ms=...)                                 # barge-in: stop; keep only what was heard
    await session.close()                                       # hangup: frees every resource of the call

`add_text()` is a typed user message (GLM-4-Voice takes text turns too); `add_message()` a text message
of any role, at the end or after a given item; `discard_audio()` drops speech the VAD judged too short;
`delete_item()` removes an item or an ended reply from the history. `respond()` with nothing pending
answers the conversation as it stands (a greeting, a follow-up); `ReplyOptions` hold what applies to one
reply only.

Transcripts of spoken turns come on their own stream, apart from the reply's, because they are computed
apart (never on the path to the reply's first audio) and may end before or after the reply starts:

    async for event in session.transcripts(): ...   # TranscriptDelta / TranscriptDone / TranscriptFailed

A session transcribes when its settings carry `transcription`; each event names its item by the same
index as `delete_item()`. Everything here is torch-free on purpose.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling knobs a client may set with `session.update` (official demo defaults)."""

    temperature: float = 0.2  # web_demo.py UI default
    top_p: float = 0.8  # web_demo.py UI default
    top_k: int = 50  # transformers' generate default, active in the official HF path
    max_new_tokens: int = 2000  # web_demo.py UI default


@dataclass(frozen=True)
class TranscriptionSettings:
    """How a session's spoken turns are transcribed (the Realtime `input_audio_transcription`)."""

    language: str = ""  # ISO-639-1 code ("en", "zh"); "" = detected per turn
    prompt: str = ""  # text the transcript continues (spellings, names); "" = none


@dataclass(frozen=True)
class SessionSettings:
    """Per-call settings that reach the responder (from the call offer or `session.update`)."""

    instructions: str = ""  # persona / emotion / dialect / speed, free text
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    transcription: TranscriptionSettings | None = None  # None: spoken turns are not transcribed


@dataclass(frozen=True)
class ReplyOptions:
    """What a client may set for one reply only (`response.create`'s `response`)."""

    instructions: str | None = (
        None  # in place of the session's instructions, for this reply; None: the session's
    )


MESSAGE_ROLES = ("user", "system", "developer", "assistant")  # add_message's roles
START = "start"  # add_message(after=START): before every other item of the conversation


# ----- events a reply yields (all plain data, safe to move across threads) -----------------------------


@dataclass(frozen=True)
class TextDelta:
    """A piece of the assistant's transcript, as generated (valid UTF-8, never a split character)."""

    text: str


@dataclass(frozen=True)
class AudioChunk:
    """Assistant audio that became final: mono float32 in [-1, 1] at `sample_rate_hz`."""

    pcm: np.ndarray  # (samples,) float32
    sample_rate_hz: int


@dataclass(frozen=True)
class Timing:
    """A point on the reply's latency timeline, `time.monotonic()` seconds.

    Names used by the GLM-4-Voice engine: tokens_ready, prefill_done, first_text_token,
    first_speech_token, first_pcm. The server adds speech_stopped and first_frame_sent.
    """

    stage: str
    t_monotonic_s: float


@dataclass(frozen=True)
class ReplyDone:
    """The reply ended. `reason`: "stop" (end token), "length", "cancelled"."""

    reason: str
    text: str = ""  # the whole transcript of the reply as kept in the history


@dataclass(frozen=True)
class ReplyError:
    """This reply failed; the call and every other call go on."""

    message: str
    code: str = "responder_error"


ReplyEvent = TextDelta | AudioChunk | Timing | ReplyDone | ReplyError


# ----- events of a session's transcript stream ----------------------------------------------------------


@dataclass(frozen=True)
class TranscriptDelta:
    """A piece of a spoken user item's transcript, as recognised; the pieces add up to the completed text."""

    item: int  # the user item's index (as `ResponderSession.delete_item`)
    text: str


@dataclass(frozen=True)
class TranscriptDone:
    """A spoken user item's whole transcript."""

    item: int
    text: str
    language: str  # the language transcribed (ISO-639-1), set or detected
    audio_ms: float  # the turn's audio that was transcribed


@dataclass(frozen=True)
class TranscriptFailed:
    """The item could not be transcribed; the call goes on."""

    item: int
    message: str
    code: str = "transcription_failed"


TranscriptEvent = TranscriptDelta | TranscriptDone | TranscriptFailed


class Reply(abc.ABC):
    """One assistant reply. Its event stream always ends with exactly one ReplyDone or ReplyError."""

    reply_id: str

    @abc.abstractmethod
    def events(self) -> AsyncIterator[ReplyEvent]:
        """Async iterator over the reply's events, in order."""

    @abc.abstractmethod
    def cancel(self, played_ms: float | None = None) -> None:
        """Stop generating and decoding at the next step (never blocks).

        `played_ms`: how much of this reply's audio the user actually heard; the responder keeps only
        that much of the reply in the conversation history. None means "nothing was played" for a
        reply with audio, or "keep what was generated" when the caller cannot tell. A later call with a
        smaller `played_ms` (the client reports playback: `conversation.item.truncate`) cuts further.
        """

    def heard_transcript(self, played_ms: float) -> str | None:
        """The reply's transcript as the history keeps it after a cut at `played_ms` (the barge-in
        heard-prefix rule). Asked once the reply's ReplyDone has arrived. None: this responder cannot tell."""
        return None


class ResponderSession(abc.ABC):
    """A call's conversation with the responder; owns every per-call resource (caches, streams)."""

    @abc.abstractmethod
    def update(self, settings: SessionSettings) -> None:
        """Apply new instructions / sampling settings from the next turn on."""

    @abc.abstractmethod
    def push_audio(self, pcm16k: np.ndarray) -> None:
        """User speech for the pending user turn: (samples,) float32 mono 16 kHz. Never blocks."""

    @abc.abstractmethod
    def commit_audio(self) -> None:
        """The user's spoken turn ended: the pushed audio becomes a user item."""

    @abc.abstractmethod
    def discard_audio(self) -> None:
        """Drop audio pushed since the last commit (a false start)."""

    @abc.abstractmethod
    def add_text(self, text: str) -> None:
        """A typed user message becomes a user item."""

    def add_message(self, role: str, text: str, after: int | Reply | str | None = None) -> None:
        """A text message of `role` (one of MESSAGE_ROLES) becomes an item, the session's next index.

        `after`: None puts it at the end (answered by the next reply, like `add_text`); START before every
        other item; an item (its index, or its Reply) right after that item, also in the history the
        model already holds. A responder that takes only user text at the end keeps this default.
        """
        if role == "user" and after is None:
            self.add_text(text)
            return
        raise NotImplementedError(f"{type(self).__name__} takes only user messages at the end")

    def delete_item(self, item: int | Reply) -> None:
        """An item leaves the conversation the model sees (`conversation.item.delete`). Never blocks.

        `item`: a message item by its index - 0-based, counting every `commit_audio()`, `add_text()` and
        `add_message()` of the session, whether or not it gave the model any input - or a reply (its
        Reply) that has ended. The input of a reply in progress cannot be deleted (the server refuses
        it). A responder that cannot edit its history keeps this default.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot delete conversation items")

    async def transcripts(self) -> AsyncIterator[TranscriptEvent]:
        """The transcripts of this session's spoken user items, in the order the items were committed; ends
        when the session closes. A responder that does not transcribe keeps this default (no events)."""
        return
        yield

    @abc.abstractmethod
    def respond(self, options: ReplyOptions | None = None) -> Reply:
        """Start the assistant's reply to the pending item(s); with none, to the conversation as it stands
        (a greeting, a follow-up). `options` apply to this reply only."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Cancel any reply in progress and free everything the call holds."""


@dataclass(frozen=True)
class ResponderInfo:
    """What /health reports about the responder."""

    name: str  # "echo", "glm4voice"
    ready: bool
    output_sample_rate_hz: int
    details: dict = field(default_factory=dict)  # weights (demo|real), device, dtype, ...


class Responder(abc.ABC):
    """Shared by every call; created once at server start."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load / warm up (off the loop). Returns when ready to serve."""

    @abc.abstractmethod
    def open_session(self, call_id: str, settings: SessionSettings) -> ResponderSession:
        """A new call's session. Must be cheap (no model work on the loop)."""

    @abc.abstractmethod
    def info(self) -> ResponderInfo:
        """Readiness and description for /health."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Shut down: stop the engine, free the device."""

"""The OpenAI Realtime event subset we speak on the `oai-events` data channel (docs/protocol.md).

Client events are parsed into small frozen dataclasses or rejected with a `ProtocolError` whose code
and message go back to the client as an `error` event. Server events are plain dicts built here, so
every name and shape lives in one file. Our own events carry the `glm4voice.` prefix.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
from dataclasses import dataclass

from pipeline.responder import SamplingSettings
from pipeline.transcription.config import WHISPER_LANGUAGES

_event_counter = itertools.count(1)


def new_event_id() -> str:
    return f"event_{next(_event_counter):08d}"


_item_counter = itertools.count(1)


def new_id(prefix: str) -> str:
    """Item and response ids (`item_000001`, `resp_000002`)."""
    return f"{prefix}_{next(_item_counter):06d}"


class ProtocolError(Exception):
    """A client event we cannot act on; becomes one `error` event, the call goes on."""

    def __init__(self, code: str, message: str, event_id: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.event_id = event_id
        self.param = param


# ----- client -> server ----------------------------------------------------------------------------


class NotUtf8Text(bytes):
    """A data-channel text message whose bytes are not UTF-8 (server/webrtc/rtc.py hands it over as this)."""


@dataclass(frozen=True)
class TurnDetectionUpdate:
    """Only the knobs the client sent; None keeps the current value."""

    enabled: bool | None = None  # False when the client sets turn_detection to null
    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None
    kind: str | None = None  # "server_vad" | "semantic_vad"
    eagerness: str | None = None  # semantic_vad only: low | medium | high | auto
    echo_guard: bool | None = (
        None  # glm4voice.echo_guard: ignore our own reply coming back (server/audio/echo_guard.py)
    )


# semantic_vad runs on the same silero VAD: `eagerness` picks how long a pause ends the turn (ms).
# Realtime's own semantic model waits up to 8 s / 4 s / 2 s for low / medium / high; a pause-based
# detector cannot wait that long without feeling dead, so these are our documented equivalents.
SEMANTIC_VAD_SILENCE_MS = {"low": 1500, "medium": 800, "auto": 800, "high": 400}

# Audio formats of the WebSocket transport (GA `audio.input.format` / `audio.output.format` types;
# the beta `input_audio_format` strings map onto them). PCM is 16-bit LE mono at 24 kHz only.
AUDIO_FORMATS = ("audio/pcm", "audio/pcmu", "audio/pcma")
# Arrays + objects in one event, counted before it is parsed (brackets inside strings count too): our
# events need tens; thousands of empty lists are ~1 MB of Python objects each, and a stream of them
# keeps the whole process's garbage collector busy.
MAX_EVENT_CONTAINERS = 1_000
PCM_RATE_HZ = 24_000
_BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
# session fields (dotted) we read; every other field is accepted, ignored and listed in session.updated
_USED_FIELDS = {
    "type",
    "instructions",
    "audio",
    "audio.input",
    "audio.output",
    "audio.input.format",
    "audio.input.turn_detection",
    "audio.input.transcription",
    "input_audio_transcription",
    "audio.output.format",
    "turn_detection",
    "input_audio_format",
    "output_audio_format",
    "temperature",
    "top_p",
    "top_k",
    "max_output_tokens",
    "max_response_output_tokens",
}


@dataclass(frozen=True)
class Transcription:
    """`audio.input.transcription` (beta: `input_audio_transcription`): transcripts of spoken user items."""

    model: str = "whisper"  # accepted and reported; the server's [transcription] model does the work
    language: str = ""  # an ISO-639-1 code Whisper knows; "" = detected per turn
    prompt: str = ""  # text the transcript continues (names, spellings)

    def json(self) -> dict:
        return {"model": self.model, "language": self.language or None, "prompt": self.prompt}


@dataclass(frozen=True)
class SessionUpdate:
    event_id: str | None
    instructions: str | None
    turn_detection: TurnDetectionUpdate | None
    sampling: dict  # SamplingSettings field -> value, only those sent
    input_format: str | None = None  # one of AUDIO_FORMATS (used by the WebSocket transport)
    output_format: str | None = None
    ignored: tuple[str, ...] = ()  # fields accepted but not honoured (docs/protocol.md, Compatibility)
    transcription_sent: bool = False  # the update names transcription (None in `transcription`: off)
    transcription: Transcription | None = None


ROOT = "root"  # previous_item_id: before every other item
MAX_ITEM_ID_CHARS = 32  # client item ids: the Realtime API's limit
_ITEM_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
ITEM_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "text", "output_text")
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512  # the API's metadata


@dataclass(frozen=True)
class ItemCreate:
    event_id: str | None
    text: str
    role: str = "user"  # one of ITEM_ROLES
    item_id: str | None = None  # the client's id (validated); None: the server names it
    previous_item_id: str | None = None  # None: at the end; ROOT: first; else right after that item


@dataclass(frozen=True)
class ItemDelete:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class ItemRetrieve:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class ItemTruncate:
    event_id: str | None
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class InputAudioAppend:
    """WebSocket transport only: `audio` is the decoded bytes, in the session's input format."""

    event_id: str | None
    audio: bytes


@dataclass(frozen=True)
class ResponseCreate:
    event_id: str | None
    instructions: str | None = None  # this reply's, in place of the session's
    metadata: dict | None = None  # echoed on response.created and response.done


@dataclass(frozen=True)
class ResponseCancel:
    event_id: str | None


@dataclass(frozen=True)
class OutputAudioClear:
    event_id: str | None


@dataclass(frozen=True)
class InputAudioCommit:
    event_id: str | None


@dataclass(frozen=True)
class InputAudioClear:
    event_id: str | None


@dataclass(frozen=True)
class Ping:  # glm4voice.ping: an app-level liveness / round-trip check, answered by glm4voice.pong
    event_id: str | None


ClientEvent = (
    SessionUpdate
    | ItemCreate
    | ResponseCreate
    | ResponseCancel
    | OutputAudioClear
    | InputAudioCommit
    | InputAudioClear
    | Ping
    | ItemDelete
    | ItemRetrieve
    | ItemTruncate
    | InputAudioAppend
)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of more than ~309 digits has no float
        return False


def _encodes(text: str) -> bool:
    """JSON's \\ud800 escapes decode to lone surrogates, which no UTF-8 channel can send back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: object, name: str, event_id: str | None) -> str:
    if not isinstance(value, str):
        raise ProtocolError("invalid_value", f"{name} must be a string", event_id, name)
    if not _encodes(value):
        raise ProtocolError(
            "invalid_value", f"{name} is not valid Unicode (a lone surrogate)", event_id, name
        )
    return value


def _flag(value: object, name: str, event_id: str | None) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError("invalid_value", f"{name} must be true or false", event_id, name)
    return value


def _number(value: object, name: str, event_id: str | None, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        raise ProtocolError("invalid_value", f"{name} must be a number", event_id, name)
    if not low <= value <= high:
        raise ProtocolError(
            "invalid_value", f"{name} must be in [{low}, {high}], got {value}", event_id, name
        )
    return value


def _parse_turn_detection(td: object, event_id: str | None) -> TurnDetectionUpdate:
    if td is None:
        return TurnDetectionUpdate(enabled=False)
    if not isinstance(td, dict):
        raise ProtocolError(
            "invalid_value", "turn_detection must be an object or null", event_id, "turn_detection"
        )
    kind = td.get("type", "server_vad")
    get = td.get
    create = (
        None if get("create_response") is None else _flag(get("create_response"), "create_response", event_id)
    )
    interrupt = (
        None
        if get("interrupt_response") is None
        else _flag(get("interrupt_response"), "interrupt_response", event_id)
    )
    ext = get("glm4voice")
    if ext is not None and not isinstance(ext, dict):
        raise ProtocolError(
            "invalid_value",
            "turn_detection.glm4voice must be an object",
            event_id,
            "turn_detection.glm4voice",
        )
    guard = (
        None
        if not ext or ext.get("echo_guard") is None
        else _flag(ext["echo_guard"], "turn_detection.glm4voice.echo_guard", event_id)
    )
    if kind == "semantic_vad":
        eagerness = get("eagerness", "auto")
        if eagerness not in SEMANTIC_VAD_SILENCE_MS:
            raise ProtocolError(
                "invalid_value",
                "eagerness must be one of low, medium, high, auto",
                event_id,
                "turn_detection.eagerness",
            )
        return TurnDetectionUpdate(
            enabled=True,
            silence_duration_ms=SEMANTIC_VAD_SILENCE_MS[eagerness],
            create_response=create,
            interrupt_response=interrupt,
            kind=kind,
            eagerness=eagerness,
            echo_guard=guard,
        )
    if kind != "server_vad":
        raise ProtocolError(
            "unsupported_value",
            f"turn_detection.type {kind!r} is not supported: use 'server_vad' or 'semantic_vad'",
            event_id,
            "turn_detection.type",
        )
    return TurnDetectionUpdate(
        enabled=True,
        threshold=None
        if get("threshold") is None
        else _number(get("threshold"), "threshold", event_id, 0.01, 0.99),
        prefix_padding_ms=None
        if get("prefix_padding_ms") is None
        else int(_number(get("prefix_padding_ms"), "prefix_padding_ms", event_id, 0, 5_000)),
        silence_duration_ms=None
        if get("silence_duration_ms") is None
        else int(_number(get("silence_duration_ms"), "silence_duration_ms", event_id, 50, 10_000)),
        create_response=create,
        interrupt_response=interrupt,
        kind=kind,
        echo_guard=guard,
    )


def _parse_format(value: object, name: str, event_id: str | None) -> str:
    """A GA format object ({type, rate}) or a beta format string -> one of AUDIO_FORMATS."""
    if isinstance(value, str) and value in _BETA_FORMATS:
        return _BETA_FORMATS[value]
    if not isinstance(value, dict) or value.get("type") not in AUDIO_FORMATS:
        raise ProtocolError(
            "invalid_value",
            f"{name} must be {{type: 'audio/pcm' (rate 24000) | 'audio/pcmu' | 'audio/pcma'}}",
            event_id,
            name,
        )
    if value["type"] == "audio/pcm" and value.get("rate", PCM_RATE_HZ) != PCM_RATE_HZ:
        raise ProtocolError("invalid_value", f"{name}: audio/pcm is 24000 Hz only", event_id, f"{name}.rate")
    return value["type"]


_TURN_DETECTION_FIELDS = {
    "type",
    "threshold",
    "prefix_padding_ms",
    "silence_duration_ms",
    "create_response",
    "interrupt_response",
    "eagerness",
}


def used_session_fields(session: dict) -> dict:
    """`session` without the fields we ignore (what a client secret keeps: the request's whole object
    may be ~1 MB of Python objects for a 64 KB body)."""

    def turns(td: object) -> object:
        if not isinstance(td, dict):
            return td
        kept = {k: v for k, v in td.items() if k in _TURN_DETECTION_FIELDS}
        if isinstance(td.get("glm4voice"), dict) and "echo_guard" in td["glm4voice"]:
            kept["glm4voice"] = {"echo_guard": td["glm4voice"]["echo_guard"]}
        return kept

    def transcription(t: object) -> object:
        return (
            {k: v for k, v in t.items() if k in ("model", "language", "prompt")} if isinstance(t, dict) else t
        )

    kept = {k: v for k, v in session.items() if k in _USED_FIELDS}
    if "turn_detection" in kept:
        kept["turn_detection"] = turns(kept["turn_detection"])
    if "input_audio_transcription" in kept:
        kept["input_audio_transcription"] = transcription(kept["input_audio_transcription"])
    if isinstance(kept.get("audio"), dict):
        audio = {k: v for k, v in kept["audio"].items() if f"audio.{k}" in _USED_FIELDS}
        for side in ("input", "output"):
            if isinstance(audio.get(side), dict):
                audio[side] = {k: v for k, v in audio[side].items() if f"audio.{side}.{k}" in _USED_FIELDS}
                if "turn_detection" in audio[side]:
                    audio[side]["turn_detection"] = turns(audio[side]["turn_detection"])
                if "transcription" in audio[side]:
                    audio[side]["transcription"] = transcription(audio[side]["transcription"])
                if isinstance(audio[side].get("format"), dict):
                    audio[side]["format"] = {
                        k: v for k, v in audio[side]["format"].items() if k in ("type", "rate")
                    }
        kept["audio"] = audio
    return kept


def _parse_transcription(
    value: object, name: str, event_id: str | None, max_chars: int
) -> Transcription | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("invalid_value", f"{name} must be an object or null", event_id, name)
    model = _text(value.get("model") or "whisper", f"{name}.model", event_id)
    language = _text(value.get("language") or "", f"{name}.language", event_id)
    if language and language not in WHISPER_LANGUAGES:
        raise ProtocolError(
            "invalid_value",
            f"{name}.language must be an ISO-639-1 code Whisper knows (en, zh, ...), got {language!r}",
            event_id,
            f"{name}.language",
        )
    prompt = _text(value.get("prompt") or "", f"{name}.prompt", event_id)
    if len(prompt) > max_chars:
        raise ProtocolError(
            "string_above_max_length",
            f"the transcription prompt is {len(prompt)} characters; the limit is {max_chars}",
            event_id,
            f"{name}.prompt",
        )
    return Transcription(model[:200], language, prompt)


def _ignored_fields(session: dict) -> tuple[str, ...]:
    ignored = [key for key in session if key not in _USED_FIELDS]
    audio = session.get("audio") if isinstance(session.get("audio"), dict) else {}
    for side in ("input", "output"):
        if isinstance(audio.get(side), dict):
            ignored += [f"audio.{side}.{k}" for k in audio[side] if f"audio.{side}.{k}" not in _USED_FIELDS]
    ignored += [f"audio.{k}" for k in audio if f"audio.{k}" not in _USED_FIELDS]
    return tuple(ignored)


def _parse_session_update(event: dict, event_id: str | None, max_instructions_chars: int) -> SessionUpdate:
    session = event.get("session")
    if not isinstance(session, dict):
        raise ProtocolError(
            "missing_required_parameter", "session.update needs a 'session' object", event_id, "session"
        )
    instructions = session.get("instructions")
    if instructions is not None:
        instructions = _text(instructions, "session.instructions", event_id)
        if len(instructions) > max_instructions_chars:
            raise ProtocolError(
                "string_above_max_length",
                f"instructions are {len(instructions)} characters; the limit is {max_instructions_chars}",
                event_id,
                "session.instructions",
            )
    # GA shape: session.audio.input.turn_detection; beta shape: session.turn_detection.
    audio = session.get("audio")
    if audio is not None and not isinstance(audio, dict):
        raise ProtocolError("invalid_value", "session.audio must be an object", event_id, "session.audio")
    audio_input = (audio or {}).get("input")
    if audio_input is None:
        audio_input = {}
    elif not isinstance(audio_input, dict):
        raise ProtocolError(
            "invalid_value", "session.audio.input must be an object", event_id, "session.audio.input"
        )
    audio_output = (audio or {}).get("output")
    if audio_output is None:
        audio_output = {}
    elif not isinstance(audio_output, dict):
        raise ProtocolError(
            "invalid_value", "session.audio.output must be an object", event_id, "session.audio.output"
        )
    input_format = output_format = None
    if audio_input.get("format") is not None:
        input_format = _parse_format(audio_input["format"], "session.audio.input.format", event_id)
    elif session.get("input_audio_format") is not None:
        input_format = _parse_format(session["input_audio_format"], "session.input_audio_format", event_id)
    if audio_output.get("format") is not None:
        output_format = _parse_format(audio_output["format"], "session.audio.output.format", event_id)
    elif session.get("output_audio_format") is not None:
        output_format = _parse_format(session["output_audio_format"], "session.output_audio_format", event_id)
    turn_detection = None
    if "turn_detection" in audio_input:
        turn_detection = _parse_turn_detection(audio_input["turn_detection"], event_id)
    elif "turn_detection" in session:
        turn_detection = _parse_turn_detection(session["turn_detection"], event_id)
    transcription, transcription_sent = None, True
    if "transcription" in audio_input:
        transcription = _parse_transcription(
            audio_input["transcription"],
            "session.audio.input.transcription",
            event_id,
            max_instructions_chars,
        )
    elif "input_audio_transcription" in session:
        transcription = _parse_transcription(
            session["input_audio_transcription"],
            "session.input_audio_transcription",
            event_id,
            max_instructions_chars,
        )
    else:
        transcription_sent = False
    sampling: dict = {}
    if "temperature" in session:
        sampling["temperature"] = _number(session["temperature"], "temperature", event_id, 0.0, 2.0)
    if "top_p" in session:
        sampling["top_p"] = _number(session["top_p"], "top_p", event_id, 0.0, 1.0)
    if "top_k" in session:
        sampling["top_k"] = int(_number(session["top_k"], "top_k", event_id, 0, 100_000))
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if key in session and session[key] == "inf":  # no limit of the client's: ours, the default
            sampling["max_new_tokens"] = SamplingSettings.max_new_tokens
        elif key in session:
            sampling["max_new_tokens"] = int(
                _number(session[key], key, event_id, 1, SamplingSettings.max_new_tokens)
            )
    return SessionUpdate(
        event_id,
        instructions,
        turn_detection,
        sampling,
        input_format,
        output_format,
        _ignored_fields(session),
        transcription_sent,
        transcription,
    )


def _parse_item_create(event: dict, event_id: str | None, max_text_chars: int) -> ItemCreate:
    item = event.get("item")
    if not isinstance(item, dict):
        raise ProtocolError(
            "missing_required_parameter", "conversation.item.create needs an 'item' object", event_id, "item"
        )
    role = item.get("role")
    if item.get("type", "message") != "message" or role not in ITEM_ROLES:
        raise ProtocolError(
            "unsupported_value",
            "only messages can be created (type 'message', role 'user', 'system', 'developer' or "
            "'assistant'; no function calls: this model has no tools)",
            event_id,
            "item.role" if item.get("type", "message") == "message" else "item.type",
        )
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise ProtocolError(
            "missing_required_parameter", "item.content must be a non-empty list", event_id, "item.content"
        )
    texts = []
    for part in content:
        if (
            not isinstance(part, dict)
            or part.get("type") not in _TEXT_PARTS
            or not isinstance(part.get("text"), str)
        ):  # a tuple: an unhashable type ([] or {}) is just unequal
            raise ProtocolError(
                "unsupported_value",
                "item.content parts must be {type: 'input_text' | 'text' | 'output_text', text: str}",
                event_id,
                "item.content",
            )
        texts.append(_text(part["text"], "item.content.text", event_id))
    text = "".join(texts).strip()
    if not text:
        raise ProtocolError("invalid_value", "the message text is empty", event_id, "item.content")
    if len(text) > max_text_chars:
        raise ProtocolError(
            "string_above_max_length",
            f"the message is {len(text)} characters; the limit is {max_text_chars}",
            event_id,
            "item.content",
        )
    item_id = None if item.get("id") is None else _client_item_id(item["id"], event_id)
    previous = event.get("previous_item_id")
    if previous is not None:
        previous = _text(previous, "previous_item_id", event_id)
    return ItemCreate(event_id, text, role, item_id, previous)


def _client_item_id(value: object, event_id: str | None) -> str:
    """A client-chosen item id: it comes back in events and names the item in later client events."""
    item_id = _text(value, "item.id", event_id)
    if len(item_id) > MAX_ITEM_ID_CHARS:
        raise ProtocolError(
            "string_above_max_length",
            f"item.id is {len(item_id)} characters; the limit is {MAX_ITEM_ID_CHARS}",
            event_id,
            "item.id",
        )
    if not item_id or not set(item_id) <= _ITEM_ID_CHARS or item_id == ROOT:
        raise ProtocolError(
            "invalid_value",
            "item.id must be letters, digits, '_' or '-' (and not 'root')",
            event_id,
            "item.id",
        )
    return item_id


def _parse_response_create(event: dict, event_id: str | None, max_instructions_chars: int) -> ResponseCreate:
    """`response`: `instructions` and `metadata` are honoured; `conversation` must be 'auto' (an
    out-of-band reply is refused); every other field is accepted and ignored."""
    response = event.get("response")
    if response is None:
        return ResponseCreate(event_id)
    if not isinstance(response, dict):
        raise ProtocolError("invalid_value", "response must be an object", event_id, "response")
    if response.get("conversation", "auto") != "auto":
        raise ProtocolError(
            "unsupported_value",
            "response.conversation must be 'auto': out-of-band replies (conversation 'none') are not "
            "supported; every reply joins the conversation",
            event_id,
            "response.conversation",
        )
    instructions = response.get("instructions")
    if instructions is not None:
        instructions = _text(instructions, "response.instructions", event_id)
        if len(instructions) > max_instructions_chars:
            raise ProtocolError(
                "string_above_max_length",
                f"instructions are {len(instructions)} characters; the limit is {max_instructions_chars}",
                event_id,
                "response.instructions",
            )
    return ResponseCreate(event_id, instructions, _metadata(response.get("metadata"), event_id))


def _metadata(value: object, event_id: str | None) -> dict | None:
    """Up to 16 string pairs (keys up to 64 characters, values up to 512), as the API's `metadata`."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_PAIRS:
        raise ProtocolError(
            "invalid_value",
            f"response.metadata must be an object of at most {MAX_METADATA_PAIRS} string pairs",
            event_id,
            "response.metadata",
        )
    for key, item in value.items():
        if (
            not isinstance(item, str)
            or len(key) > MAX_METADATA_KEY_CHARS
            or len(item) > MAX_METADATA_VALUE_CHARS
        ):
            raise ProtocolError(
                "invalid_value",
                f"response.metadata: keys up to {MAX_METADATA_KEY_CHARS} characters, values strings up to "
                f"{MAX_METADATA_VALUE_CHARS}",
                event_id,
                "response.metadata",
            )
        _text(key, "response.metadata", event_id)
        _text(item, "response.metadata", event_id)
    return dict(value)


def _item_id(event: dict, event_id: str | None) -> str:
    item_id = event.get("item_id")
    if not isinstance(item_id, str) or not item_id:
        raise ProtocolError(
            "missing_required_parameter", f"{event.get('type')} needs an 'item_id'", event_id, "item_id"
        )
    return _text(item_id, "item_id", event_id)


def _parse_append(event: dict, event_id: str | None) -> InputAudioAppend:
    audio = event.get("audio")
    if not isinstance(audio, str):
        raise ProtocolError(
            "missing_required_parameter",
            "input_audio_buffer.append needs 'audio' (base64)",
            event_id,
            "audio",
        )
    try:
        return InputAudioAppend(event_id, base64.b64decode(audio, validate=True))
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_value", "audio is not valid base64", event_id, "audio") from None


def _parse_item_event(kind: str, event: dict, event_id: str | None) -> ClientEvent:
    item_id = _item_id(event, event_id)
    if kind == "conversation.item.delete":
        return ItemDelete(event_id, item_id)
    if kind == "conversation.item.retrieve":
        return ItemRetrieve(event_id, item_id)
    if event.get("content_index", 0) != 0:
        raise ProtocolError(
            "invalid_value",
            "content_index must be 0 (an assistant item has one audio part)",
            event_id,
            "content_index",
        )
    end_ms = int(_number(event.get("audio_end_ms"), "audio_end_ms", event_id, 0, 24 * 3600 * 1000))
    return ItemTruncate(event_id, item_id, end_ms)


def peek_event_id(message: str | bytes) -> str | None:
    """The `event_id` of a message not otherwise read (an event dropped over the rate), if it has one."""
    if not isinstance(message, str):
        return None
    try:
        event_id = json.loads(message).get("event_id")
    except (ValueError, RecursionError, AttributeError):
        return None
    return event_id if isinstance(event_id, str) and _encodes(event_id) else None


def parse_client_event(
    message: str | bytes,
    *,
    max_event_bytes: int,
    max_text_chars: int,
    max_instructions_chars: int,
    max_audio_event_bytes: int = 0,
) -> ClientEvent:
    """One data-channel or WebSocket message -> a client event, or ProtocolError.

    `max_audio_event_bytes`: the WebSocket transport's larger bound for `input_audio_buffer.append`
    (0: appends are bound by `max_event_bytes` like every other event)."""
    if isinstance(message, NotUtf8Text):
        raise ProtocolError("invalid_event", "a text message that is not valid UTF-8")
    if isinstance(message, bytes):
        raise ProtocolError("invalid_event", "events are JSON text messages, not binary")
    size = len(message.encode("utf-8", "surrogatepass"))
    if size > max(max_event_bytes, max_audio_event_bytes):
        raise ProtocolError(
            "message_too_large", f"event is larger than {max(max_event_bytes, max_audio_event_bytes)} bytes"
        )
    if message.count("[") + message.count("{") > MAX_EVENT_CONTAINERS:
        raise ProtocolError("invalid_json", f"event has more than {MAX_EVENT_CONTAINERS} arrays and objects")
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):
        raise ProtocolError("invalid_json", "event is not valid JSON") from None
    if not isinstance(event, dict):
        raise ProtocolError("invalid_event", "event must be a JSON object")
    event_id = event.get("event_id")
    if event_id is not None:  # it comes back in our error events: it must be a string we can send
        event_id = _text(event_id, "event_id", None)
    kind = event.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("missing_required_parameter", "event has no 'type'", event_id, "type")
    kind = _text(kind, "type", event_id)
    if kind == "input_audio_buffer.append":
        return _parse_append(event, event_id)
    if size > max_event_bytes:
        raise ProtocolError("message_too_large", f"event is larger than {max_event_bytes} bytes", event_id)
    if kind in ("conversation.item.delete", "conversation.item.retrieve", "conversation.item.truncate"):
        return _parse_item_event(kind, event, event_id)
    if kind == "session.update":
        return _parse_session_update(event, event_id, max_instructions_chars)
    if kind == "conversation.item.create":
        return _parse_item_create(event, event_id, max_text_chars)
    if kind == "response.create":
        return _parse_response_create(event, event_id, max_instructions_chars)
    if kind == "response.cancel":
        return ResponseCancel(event_id)
    if kind == "output_audio_buffer.clear":
        return OutputAudioClear(event_id)
    if kind == "input_audio_buffer.commit":
        return InputAudioCommit(event_id)
    if kind == "input_audio_buffer.clear":
        return InputAudioClear(event_id)
    if kind == "glm4voice.ping":
        return Ping(event_id)
    raise ProtocolError(
        "unknown_event", f"unsupported event type {kind!r} (see docs/protocol.md)", event_id, "type"
    )


# ----- server -> client ----------------------------------------------------------------------------


def event(kind: str, **fields: object) -> dict:
    return {"type": kind, "event_id": new_event_id(), **fields}


def error_event(
    code: str,
    message: str,
    *,
    event_id: str | None = None,
    param: str | None = None,
    error_type: str = "invalid_request_error",
) -> dict:
    return event(
        "error",
        error={"type": error_type, "code": code, "message": message, "param": param, "event_id": event_id},
    )


def format_object(kind: str) -> dict:
    return {"type": kind, "rate": PCM_RATE_HZ} if kind == "audio/pcm" else {"type": kind}


def session_object(
    call_id: str,
    instructions: str,
    td: dict | None,
    sampling: SamplingSettings,
    responder: str,
    input_format: str = "audio/pcm",
    output_format: str = "audio/pcm",
    ignored: tuple[str, ...] = (),
    transcription: Transcription | None = None,
) -> dict:
    """The `session` object of session.created / session.updated (Realtime GA shape + our extras): the
    effective session, plus `glm4voice.ignored_fields` (what the last update sent that we cannot honour)."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": call_id,
        "model": responder,
        "output_modalities": ["audio"],
        "instructions": instructions,
        "audio": {
            "input": {
                "format": format_object(input_format),
                "turn_detection": td,
                "transcription": transcription.json() if transcription is not None else None,
            },
            "output": {"format": format_object(output_format)},
        },
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_output_tokens": sampling.max_new_tokens,
        "glm4voice": {"ignored_fields": list(ignored)},
    }


def user_item(item_id: str, text: str | None, transcript: str | None = None) -> dict:
    """A completed user message: typed (`input_text`) or spoken (`input_audio`; its transcript null until
    transcription has completed, and for a session without transcription)."""
    if text is None:
        return {
            **message_item(item_id, "user", ""),
            "content": [{"type": "input_audio", "transcript": transcript}],
        }
    return message_item(item_id, "user", text)


def message_item(item_id: str, role: str, text: str) -> dict:
    """A completed text message a client created: `output_text` for an assistant, else `input_text`."""
    part = {"type": "output_text" if role == "assistant" else "input_text", "text": text}
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": role,
        "status": "completed",
        "content": [part],
    }


TRANSCRIPTION = "conversation.item.input_audio_transcription"


def transcription_delta(item_id: str, delta: str) -> dict:
    return event(f"{TRANSCRIPTION}.delta", item_id=item_id, content_index=0, delta=delta)


def transcription_completed(item_id: str, transcript: str, audio_s: float) -> dict:
    """`usage` as OpenAI reports it for duration-billed models: the seconds of audio transcribed."""
    return event(
        f"{TRANSCRIPTION}.completed",
        item_id=item_id,
        content_index=0,
        transcript=transcript,
        usage={"type": "duration", "seconds": round(audio_s, 3)},
    )


def transcription_failed(item_id: str, code: str, message: str) -> dict:
    return event(
        f"{TRANSCRIPTION}.failed",
        item_id=item_id,
        content_index=0,
        error={"type": "transcription_error", "code": code, "message": message, "param": None},
    )


def assistant_item(item_id: str, status: str, transcript: str | None) -> dict:
    """`status`: in_progress | completed | incomplete. No content part until the reply has one."""
    content = [] if transcript is None else [{"type": "output_audio", "transcript": transcript}]
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def response_object(
    response_id: str,
    status: str,
    status_details: dict | None = None,
    output: list[dict] | None = None,
    metadata: dict | None = None,
) -> dict:
    """`metadata`: the client's, from response.create (echoed on response.created and response.done)."""
    return {
        "object": "realtime.response",
        "id": response_id,
        "status": status,
        "status_details": status_details,
        "output": output or [],
        "metadata": metadata,
    }


def dumps(message: dict) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))

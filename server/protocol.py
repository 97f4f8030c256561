"""The OpenAI Realtime event subset we speak on the `oai-events` data channel (docs/protocol.md).

Client events are parsed into small frozen dataclasses or rejected with a `ProtocolError` whose code
and message go back to the client as an `error` event. Server events are plain dicts built here, so
every name and shape lives in one file. Our own events carry the `glm4voice.` prefix.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

from pipeline.responder import SamplingSettings

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


@dataclass(frozen=True)
class TurnDetectionUpdate:
    """Only the knobs the client sent; None keeps the current value."""

    enabled: bool | None = None  # False when the client sets turn_detection to null
    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None


@dataclass(frozen=True)
class SessionUpdate:
    event_id: str | None
    instructions: str | None
    turn_detection: TurnDetectionUpdate | None
    sampling: dict  # SamplingSettings field -> value, only those sent


@dataclass(frozen=True)
class ItemCreate:
    event_id: str | None
    text: str


@dataclass(frozen=True)
class ResponseCreate:
    event_id: str | None


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


ClientEvent = (SessionUpdate | ItemCreate | ResponseCreate | ResponseCancel | OutputAudioClear | InputAudioCommit
               | InputAudioClear | Ping)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of more than ~309 digits has no float
        return False


def _number(value: object, name: str, event_id: str | None, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        raise ProtocolError("invalid_value", f"{name} must be a number", event_id, name)
    if not low <= value <= high:
        raise ProtocolError("invalid_value", f"{name} must be in [{low}, {high}], got {value}", event_id, name)
    return value


def _parse_turn_detection(td: object, event_id: str | None) -> TurnDetectionUpdate:
    if td is None:
        return TurnDetectionUpdate(enabled=False)
    if not isinstance(td, dict):
        raise ProtocolError("invalid_value", "turn_detection must be an object or null", event_id, "turn_detection")
    kind = td.get("type", "server_vad")
    if kind != "server_vad":
        raise ProtocolError("unsupported_value", f"turn_detection.type {kind!r} is not supported: use 'server_vad'",
                            event_id, "turn_detection.type")
    get = td.get
    return TurnDetectionUpdate(
        enabled=True,
        threshold=None if get("threshold") is None else _number(get("threshold"), "threshold", event_id, 0.01, 0.99),
        prefix_padding_ms=None if get("prefix_padding_ms") is None
        else int(_number(get("prefix_padding_ms"), "prefix_padding_ms", event_id, 0, 5_000)),
        silence_duration_ms=None if get("silence_duration_ms") is None
        else int(_number(get("silence_duration_ms"), "silence_duration_ms", event_id, 50, 10_000)),
        create_response=None if get("create_response") is None else bool(get("create_response")),
        interrupt_response=None if get("interrupt_response") is None else bool(get("interrupt_response")),
    )


def _parse_session_update(event: dict, event_id: str | None, max_instructions_chars: int) -> SessionUpdate:
    session = event.get("session")
    if not isinstance(session, dict):
        raise ProtocolError("missing_required_parameter", "session.update needs a 'session' object", event_id, "session")
    instructions = session.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ProtocolError("invalid_value", "instructions must be a string", event_id, "session.instructions")
        if len(instructions) > max_instructions_chars:
            raise ProtocolError("string_above_max_length",
                                f"instructions are {len(instructions)} characters; the limit is {max_instructions_chars}",
                                event_id, "session.instructions")
    # GA shape: session.audio.input.turn_detection; beta shape: session.turn_detection.
    audio = session.get("audio")
    if audio is not None and not isinstance(audio, dict):
        raise ProtocolError("invalid_value", "session.audio must be an object", event_id, "session.audio")
    audio_input = (audio or {}).get("input")
    if audio_input is None:
        audio_input = {}
    elif not isinstance(audio_input, dict):
        raise ProtocolError("invalid_value", "session.audio.input must be an object", event_id, "session.audio.input")
    turn_detection = None
    if "turn_detection" in audio_input:
        turn_detection = _parse_turn_detection(audio_input["turn_detection"], event_id)
    elif "turn_detection" in session:
        turn_detection = _parse_turn_detection(session["turn_detection"], event_id)
    sampling: dict = {}
    if "temperature" in session:
        sampling["temperature"] = _number(session["temperature"], "temperature", event_id, 0.0, 2.0)
    if "top_p" in session:
        sampling["top_p"] = _number(session["top_p"], "top_p", event_id, 0.0, 1.0)
    if "top_k" in session:
        sampling["top_k"] = int(_number(session["top_k"], "top_k", event_id, 0, 100_000))
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if key in session and session[key] != "inf":
            sampling["max_new_tokens"] = int(_number(session[key], key, event_id, 1, SamplingSettings.max_new_tokens))
    return SessionUpdate(event_id, instructions, turn_detection, sampling)


def _parse_item_create(event: dict, event_id: str | None, max_text_chars: int) -> ItemCreate:
    item = event.get("item")
    if not isinstance(item, dict):
        raise ProtocolError("missing_required_parameter", "conversation.item.create needs an 'item' object",
                            event_id, "item")
    if item.get("type", "message") != "message" or item.get("role") != "user":
        raise ProtocolError("unsupported_value", "only user messages can be created (type 'message', role 'user')",
                            event_id, "item.role")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise ProtocolError("missing_required_parameter", "item.content must be a non-empty list", event_id,
                            "item.content")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in {"input_text", "text"} \
                or not isinstance(part.get("text"), str):
            raise ProtocolError("unsupported_value", "item.content parts must be {type: 'input_text', text: str}",
                                event_id, "item.content")
        texts.append(part["text"])
    text = "".join(texts).strip()
    if not text:
        raise ProtocolError("invalid_value", "the message text is empty", event_id, "item.content")
    if len(text) > max_text_chars:
        raise ProtocolError("string_above_max_length", f"the message is {len(text)} characters; the limit is "
                            f"{max_text_chars}", event_id, "item.content")
    return ItemCreate(event_id, text)


def parse_client_event(message: str | bytes, *, max_event_bytes: int, max_text_chars: int,
                       max_instructions_chars: int) -> ClientEvent:
    """One data-channel message -> a client event, or ProtocolError."""
    if isinstance(message, bytes):
        raise ProtocolError("invalid_event", "events are JSON text messages, not binary")
    if len(message.encode("utf-8", "surrogatepass")) > max_event_bytes:
        raise ProtocolError("message_too_large", f"event is larger than {max_event_bytes} bytes")
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):
        raise ProtocolError("invalid_json", "event is not valid JSON") from None
    if not isinstance(event, dict):
        raise ProtocolError("invalid_event", "event must be a JSON object")
    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
    kind = event.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("missing_required_parameter", "event has no 'type'", event_id, "type")
    if kind == "session.update":
        return _parse_session_update(event, event_id, max_instructions_chars)
    if kind == "conversation.item.create":
        return _parse_item_create(event, event_id, max_text_chars)
    if kind == "response.create":
        return ResponseCreate(event_id)
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
    raise ProtocolError("unknown_event", f"unsupported event type {kind!r} (see docs/protocol.md)", event_id, "type")


# ----- server -> client ----------------------------------------------------------------------------


def event(kind: str, **fields: object) -> dict:
    return {"type": kind, "event_id": new_event_id(), **fields}


def error_event(code: str, message: str, *, event_id: str | None = None, param: str | None = None,
                error_type: str = "invalid_request_error") -> dict:
    return event("error", error={"type": error_type, "code": code, "message": message, "param": param,
                                 "event_id": event_id})


def session_object(call_id: str, instructions: str, td: dict | None, sampling: SamplingSettings,
                   responder: str) -> dict:
    """The `session` object of session.created / session.updated (Realtime GA shape + our extras)."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": call_id,
        "model": responder,
        "output_modalities": ["audio"],
        "instructions": instructions,
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": td},
            "output": {"format": {"type": "audio/pcm", "rate": 48000}},
        },
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_output_tokens": sampling.max_new_tokens,
    }


def response_object(response_id: str, status: str, status_details: dict | None = None,
                    transcript: str | None = None) -> dict:
    output = []
    if transcript is not None:
        output = [{"type": "message", "role": "assistant", "status": "completed" if status == "completed" else status,
                   "content": [{"type": "output_audio", "transcript": transcript}]}]
    return {"object": "realtime.response", "id": response_id, "status": status, "status_details": status_details,
            "output": output}


def dumps(message: dict) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))

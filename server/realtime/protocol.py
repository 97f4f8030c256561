"""The OpenAI Realtime client events we take (docs/protocol.md), over the `oai-events` data channel or
the WebSocket: each message is parsed into a small frozen dataclass or rejected with a `ProtocolError` whose
code and message go back to the client as an `error` event. `session.update` is read in session_update.py;
the events we send are built in events.py.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from server.realtime.fields import NotUtf8Text, ProtocolError, check_number, check_text, encodes
from server.realtime.session_update import SessionUpdate, parse_session_update

# Arrays + objects in one event, counted before it is parsed (brackets inside strings count too): our
# events need tens; thousands of empty lists are ~1 MB of Python objects each, and a stream of them
# keeps the whole process's garbage collector busy.
MAX_EVENT_CONTAINERS = 1_000
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
        texts.append(check_text(part["text"], "item.content.text", event_id))
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
        previous = check_text(previous, "previous_item_id", event_id)
    return ItemCreate(event_id, text, role, item_id, previous)


def _client_item_id(value: object, event_id: str | None) -> str:
    """A client-chosen item id: it comes back in events and names the item in later client events."""
    item_id = check_text(value, "item.id", event_id)
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
        instructions = check_text(instructions, "response.instructions", event_id)
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
        check_text(key, "response.metadata", event_id)
        check_text(item, "response.metadata", event_id)
    return dict(value)


def _item_id(event: dict, event_id: str | None) -> str:
    item_id = event.get("item_id")
    if not isinstance(item_id, str) or not item_id:
        raise ProtocolError(
            "missing_required_parameter", f"{event.get('type')} needs an 'item_id'", event_id, "item_id"
        )
    return check_text(item_id, "item_id", event_id)


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
    end_ms = int(check_number(event.get("audio_end_ms"), "audio_end_ms", event_id, 0, 24 * 3600 * 1000))
    return ItemTruncate(event_id, item_id, end_ms)


def peek_event_id(message: str | bytes) -> str | None:
    """The `event_id` of a message not otherwise read (an event dropped over the rate), if it has one."""
    if not isinstance(message, str):
        return None
    try:
        event_id = json.loads(message).get("event_id")
    except (ValueError, RecursionError, AttributeError):
        return None
    return event_id if isinstance(event_id, str) and encodes(event_id) else None


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
        event_id = check_text(event_id, "event_id", None)
    kind = event.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("missing_required_parameter", "event has no 'type'", event_id, "type")
    kind = check_text(kind, "type", event_id)
    if kind == "input_audio_buffer.append":
        return _parse_append(event, event_id)
    if size > max_event_bytes:
        raise ProtocolError("message_too_large", f"event is larger than {max_event_bytes} bytes", event_id)
    if kind in ("conversation.item.delete", "conversation.item.retrieve", "conversation.item.truncate"):
        return _parse_item_event(kind, event, event_id)
    if kind == "session.update":
        return parse_session_update(event, event_id, max_instructions_chars)
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

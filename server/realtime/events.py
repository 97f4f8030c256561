"""The events we send (docs/protocol.md): plain dicts built here, so every name and shape lives in one
file. Our own events carry the `glm4voice.` prefix.
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING

from server.realtime.session_update import PCM_RATE_HZ

if TYPE_CHECKING:
    from pipeline.responder import SamplingSettings
    from server.realtime.session_update import Transcription


_event_counter = itertools.count(1)


def new_event_id() -> str:
    return f"event_{next(_event_counter):08d}"


_item_counter = itertools.count(1)


def new_id(prefix: str) -> str:
    """Item and response ids (`item_000001`, `resp_000002`)."""
    return f"{prefix}_{next(_item_counter):06d}"


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

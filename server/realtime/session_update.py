"""`session.update` (and the session of a client secret or a call offer): the fields we read, validated
into a `SessionUpdate`; every other field is accepted, ignored and listed back (docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.responder import SamplingSettings
from pipeline.transcription.config import WHISPER_LANGUAGES
from server.realtime.fields import ProtocolError, check_flag, check_number, check_text

# Audio formats of the WebSocket transport (GA `audio.input.format` / `audio.output.format` types;
# the beta `input_audio_format` strings map onto them). PCM is 16-bit LE mono at 24 kHz only.
AUDIO_FORMATS = ("audio/pcm", "audio/pcmu", "audio/pcma")
PCM_RATE_HZ = 24_000


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
        None
        if get("create_response") is None
        else check_flag(get("create_response"), "create_response", event_id)
    )
    interrupt = (
        None
        if get("interrupt_response") is None
        else check_flag(get("interrupt_response"), "interrupt_response", event_id)
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
        else check_flag(ext["echo_guard"], "turn_detection.glm4voice.echo_guard", event_id)
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
        else check_number(get("threshold"), "threshold", event_id, 0.01, 0.99),
        prefix_padding_ms=None
        if get("prefix_padding_ms") is None
        else int(check_number(get("prefix_padding_ms"), "prefix_padding_ms", event_id, 0, 5_000)),
        silence_duration_ms=None
        if get("silence_duration_ms") is None
        else int(check_number(get("silence_duration_ms"), "silence_duration_ms", event_id, 50, 10_000)),
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
    model = check_text(value.get("model") or "whisper", f"{name}.model", event_id)
    language = check_text(value.get("language") or "", f"{name}.language", event_id)
    if language and language not in WHISPER_LANGUAGES:
        raise ProtocolError(
            "invalid_value",
            f"{name}.language must be an ISO-639-1 code Whisper knows (en, zh, ...), got {language!r}",
            event_id,
            f"{name}.language",
        )
    prompt = check_text(value.get("prompt") or "", f"{name}.prompt", event_id)
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


def parse_session_update(event: dict, event_id: str | None, max_instructions_chars: int) -> SessionUpdate:
    session = event.get("session")
    if not isinstance(session, dict):
        raise ProtocolError(
            "missing_required_parameter", "session.update needs a 'session' object", event_id, "session"
        )
    instructions = session.get("instructions")
    if instructions is not None:
        instructions = check_text(instructions, "session.instructions", event_id)
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
        sampling["temperature"] = check_number(session["temperature"], "temperature", event_id, 0.0, 2.0)
    if "top_p" in session:
        sampling["top_p"] = check_number(session["top_p"], "top_p", event_id, 0.0, 1.0)
    if "top_k" in session:
        sampling["top_k"] = int(check_number(session["top_k"], "top_k", event_id, 0, 100_000))
    for key in ("max_output_tokens", "max_response_output_tokens"):
        if key in session and session[key] == "inf":  # no limit of the client's: ours, the default
            sampling["max_new_tokens"] = SamplingSettings.max_new_tokens
        elif key in session:
            sampling["max_new_tokens"] = int(
                check_number(session[key], key, event_id, 1, SamplingSettings.max_new_tokens)
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

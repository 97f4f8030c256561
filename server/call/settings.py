"""What a client can change during a call (`session.update`), as one immutable value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.responder import SamplingSettings, SessionSettings, TranscriptionSettings
from server.audio.turns import TurnSettings
from server.config import TurnDetectionConfig
from server.realtime import session_update


@dataclass(frozen=True)
class CallSettings:
    """What a client can change during a call (session.update) - all of it, in one value."""

    instructions: str
    sampling: SamplingSettings
    turns: TurnSettings
    vad_kind: str = "server_vad"  # or "semantic_vad": the same silero VAD, silence from `eagerness`
    eagerness: str | None = None
    input_format: str = "audio/pcm"  # WebSocket audio (protocol.AUDIO_FORMATS); WebRTC carries Opus
    output_format: str = "audio/pcm"
    ignored: tuple[str, ...] = ()  # fields of the last update we accepted but cannot honour
    transcription: session_update.Transcription | None = (
        None  # spoken user items are transcribed (docs/protocol.md)
    )

    def responder_settings(self) -> SessionSettings:
        t = self.transcription
        return SessionSettings(
            instructions=self.instructions,
            sampling=self.sampling,
            transcription=None if t is None else TranscriptionSettings(language=t.language, prompt=t.prompt),
        )

    def apply(self, update: session_update.SessionUpdate) -> CallSettings:
        turns = self.turns
        td = update.turn_detection
        vad_kind, eagerness = self.vad_kind, self.eagerness
        if td is not None:
            changes = {
                k: v
                for k, v in dataclasses.asdict(td).items()
                if v is not None and k not in ("kind", "eagerness")
            }
            turns = dataclasses.replace(turns, **changes)
            vad_kind, eagerness = td.kind or vad_kind, td.eagerness if td.kind else eagerness
        return CallSettings(
            instructions=self.instructions if update.instructions is None else update.instructions,
            sampling=dataclasses.replace(self.sampling, **update.sampling),
            turns=turns,
            vad_kind=vad_kind,
            eagerness=eagerness,
            input_format=update.input_format or self.input_format,
            output_format=update.output_format or self.output_format,
            ignored=update.ignored,
            transcription=update.transcription if update.transcription_sent else self.transcription,
        )

    def without_transcription(self) -> CallSettings:
        """The responder cannot transcribe: a request for it is reported as ignored, and off."""
        if self.transcription is None:
            return self
        return dataclasses.replace(
            self, transcription=None, ignored=(*self.ignored, "audio.input.transcription")
        )

    @classmethod
    def defaults(cls, td: TurnDetectionConfig) -> CallSettings:
        """A new call's settings: the config's turn detection, no instructions, demo sampling."""
        turns = TurnSettings(
            threshold=td.threshold,
            prefix_padding_ms=td.prefix_padding_ms,
            silence_duration_ms=td.silence_duration_ms,
            min_speech_ms=td.min_speech_ms,
            min_interrupt_ms=td.min_interrupt_ms,
            create_response=td.create_response,
            interrupt_response=td.interrupt_response,
            echo_guard=td.echo_guard,
        )
        return cls(instructions="", sampling=SamplingSettings(), turns=turns)

    def turn_detection_json(self) -> dict | None:
        t = self.turns
        if not t.enabled:
            return None
        if self.vad_kind == "semantic_vad":
            return {
                "type": "semantic_vad",
                "eagerness": self.eagerness,
                "create_response": t.create_response,
                "interrupt_response": t.interrupt_response,
                "glm4voice": {
                    "silence_duration_ms": t.silence_duration_ms,
                    "threshold": t.threshold,
                    "echo_guard": t.echo_guard,
                },
            }
        return {
            "type": "server_vad",
            "threshold": t.threshold,
            "prefix_padding_ms": t.prefix_padding_ms,
            "silence_duration_ms": t.silence_duration_ms,
            "create_response": t.create_response,
            "interrupt_response": t.interrupt_response,
            "glm4voice": {
                "min_speech_ms": t.min_speech_ms,
                "min_interrupt_ms": t.min_interrupt_ms,
                "echo_guard": t.echo_guard,
            },
        }

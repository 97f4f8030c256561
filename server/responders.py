"""Build the configured responder. Imports the heavy engine lazily so the server stays torch-free."""

from __future__ import annotations

from pipeline.engine.config import EngineConfig, VLLMConfig
from pipeline.responder import Responder
from pipeline.transcription.config import TranscriptionConfig


def make_responder(
    kind: str,
    engine: EngineConfig,
    vllm: VLLMConfig | None = None,
    transcription: TranscriptionConfig | None = None,
) -> Responder:
    """`kind`: "echo" (mic check, no models) or "glm4voice" (the speech model engine; its LM served by
    `vllm` when `engine.lm_backend` is "vllm"; spoken turns transcribed as `transcription` says)."""
    if kind == "echo":
        from server.echo import EchoResponder

        return EchoResponder()
    if kind == "glm4voice":
        from pipeline.engine.thread import GLMVoiceResponder  # imports torch, in the engine thread's module

        return GLMVoiceResponder(engine, vllm, transcription)
    raise ValueError(f"unknown responder kind {kind!r}: expected 'echo' or 'glm4voice'")

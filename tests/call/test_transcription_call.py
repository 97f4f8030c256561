"""Transcripts of spoken turns over loopback WebRTC (the data channel), on demo weights with the
transcription stage on: the session in the offer turns it on, the events name the committed user item,
and the page's duration arrives beside the words (its speech_started / speech_stopped)."""

from __future__ import annotations

import numpy as np

from pipeline.engine.config import EngineConfig
from pipeline.engine.thread import GLMVoiceResponder
from pipeline.transcription.config import TranscriptionConfig
from tests.helpers.rtc_client import RealtimeClient, start_server
from tests.helpers.speech import have_speech_tools, synth_speech

assert have_speech_tools(), "espeak-ng and sox are needed (make test installs them)"
T = "conversation.item.input_audio_transcription"


async def test_spoken_turn_transcript_on_the_data_channel(demo_dir):
    responder = GLMVoiceResponder(
        EngineConfig(demo_weights_dir=str(demo_dir), device="cpu"),
        transcription=TranscriptionConfig(enabled="on"),
    )
    running = await start_server(responder=responder, kind="glm4voice")
    client = RealtimeClient(running.base_url)
    try:
        await client.connect(as_json=True, session={"input_audio_transcription": {"model": "whisper-1"}})
        created = await client.wait_for("session.created", 10)
        assert created["session"]["audio"]["input"]["transcription"]["model"] == "whisper-1"
        speech = synth_speech("Hello, can you hear me?")
        client.mic.play(np.concatenate([speech, np.zeros(int(1.2 * 16_000), np.float32)]), 16_000)
        committed = await client.wait_for("input_audio_buffer.committed", 20)
        completed = await client.wait_for(f"{T}.completed", 60)
        await client.wait_for("response.done", 60)
        assert completed["item_id"] == committed["item_id"] and completed["transcript"]
        deltas = [e["delta"] for e in client.of_type(f"{T}.delta") if e["item_id"] == committed["item_id"]]
        assert "".join(deltas) == completed["transcript"]
        assert abs(completed["usage"]["seconds"] - speech.size / 16_000) < 1.0  # the turn, give or take VAD
        assert client.of_type("error") == []
    finally:
        await client.hangup()
        await running.runner.cleanup()

"""The server's echo guard (docs/protocol.md, server/audio/echo_guard.py) with the headless client in
hands-free
mode over a simulated echo path (its speaker mixed into its microphone at -10 dB), on the echo responder
(its reply is speech - the user's turn played back - so its echo is loud enough to barge in unguarded).

Without the guard the reply cuts itself off; with it the reply plays to the end, and a real interruption
(espeak speech at its normal level over the echo) still cuts it. Printed: the guard's figures."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from client.call import CallOptions
from tests.client.conftest import EchoPath, ScriptedMic, Speaker, start_call
from tests.helpers.speech import synth_speech

GUARD_ON = {
    "type": "session.update",
    "session": {
        "audio": {"input": {"turn_detection": {"type": "server_vad", "glm4voice": {"echo_guard": True}}}}
    },
}


async def _call(
    base_url: str, guard: bool, echo_db: float | None, speech: np.ndarray, interruption: np.ndarray | None
) -> tuple[dict, float | None, list[dict]]:
    """One spoken turn; its reply comes back `echo_db` down (None: no echo path); `interruption` is spoken
    1 s into the reply. -> (the reply's client.turn, ms from the interruption's first sample to its
    speech_started event, every event)."""
    mic = ScriptedMic()
    source = sink = EchoPath(mic, gain_db=echo_db) if echo_db is not None else None
    if source is None:
        source, sink = mic, Speaker()
    call, rec, task = start_call(CallOptions(base_url, mode="hands_free"), source, sink)
    try:
        await rec.wait_for("session.created", 20)
        if guard:
            call.send(GUARD_ON)
            updated = await rec.wait_for("session.updated", 5)
            assert updated["session"]["audio"]["input"]["turn_detection"]["glm4voice"]["echo_guard"] is True
        mic.play(np.concatenate([speech, np.zeros(16_000, np.float32)]), 16_000)
        await rec.wait_for("output_audio_buffer.started", 30)
        latency_ms = None
        if interruption is not None:
            await asyncio.sleep(1.0)
            mark = len(rec.events)
            t0 = time.monotonic()
            mic.play(np.concatenate([interruption, np.zeros(16_000, np.float32)]), 16_000)
            started = await rec.wait_for("input_audio_buffer.speech_started", 10, after=mark)
            latency_ms = (rec.times[rec.events.index(started)] - t0) * 1000
        turn = await rec.wait_for("client.turn", 60)
        return turn, latency_ms, rec.events
    finally:
        call.stop()
        await task


async def test_echo_guard_stops_self_barge_in_and_keeps_real_interruptions(echo_server):
    speech = synth_speech("Hello, can you hear me? Tell me about the weather tomorrow.")
    interruption = synth_speech("No wait, stop, tell me about the traffic instead.")
    # control: unguarded, the echo alone cuts the reply off
    control, _, _ = await _call(echo_server.base_url, False, -10.0, speech, None)
    assert control["cut_off"] == "turn_detected", "the simulated echo did not reach the server's VAD"
    guarded, _, events = await _call(echo_server.base_url, True, -10.0, speech, None)
    assert guarded["cut_off"] is None and guarded["status"] == "completed"
    assert guarded["heard_audio_ms"] / 1000 >= 0.8 * speech.size / 16_000  # it played to the end
    playing = next(i for i, e in enumerate(events) if e["type"] == "output_audio_buffer.started")
    turn_end = next(i for i, e in enumerate(events) if e["type"] == "client.turn")
    heard = [e["type"] for e in events[playing:turn_end]]
    assert "input_audio_buffer.speech_started" not in heard and "glm4voice.response.cancelled" not in heard
    # a real interruption over the echo still cuts the reply
    cut, guarded_ms, _ = await _call(echo_server.base_url, True, -10.0, speech, interruption)
    assert cut["cut_off"] == "turn_detected"
    # the reference: no echo path and no guard (a client with perfect echo cancellation)
    clean, clean_ms, _ = await _call(echo_server.base_url, False, None, speech, interruption)
    assert clean["cut_off"] == "turn_detected"
    print(
        f"echo guard: unguarded reply cut by its own echo: {control['cut_off'] == 'turn_detected'}; guarded: "
        f"{guarded['cut_off'] is not None}; interruption over the echo kept: "
        f"{cut['cut_off'] == 'turn_detected'}"
    )
    print(
        f"echo guard: interruption -> speech_started {guarded_ms:.0f} ms guarded over the echo, "
        f"{clean_ms:.0f} ms unguarded without echo (added {guarded_ms - clean_ms:+.0f} ms)"
    )

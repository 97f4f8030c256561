"""`glm4voice call` against a real server on demo weights, over loopback, with WAV files and a scripted
microphone: a spoken turn (CLI, WAV in and out), push-to-talk, half-duplex under a simulated echo path,
and a server restart mid-call. What the assistant says is the demo weights' script (demo_script.json)."""

from __future__ import annotations

import asyncio
import json
import sys
import wave
from pathlib import Path

import numpy as np

from client.audio_io import WIRE_RATE_HZ
from client.call import CallOptions
from pipeline.weights.demo import MESSAGE
from tests.client.conftest import EchoPath, ScriptedMic, Speaker, serve_glm, start_call
from tests.helpers.speech import synth_speech, write_wav

ROOT = Path(__file__).resolve().parents[2]
SPEECH_TOKEN_MS = 80.0  # pipeline/audio_format.py SPEECH_TOKEN_MS
FRAME = 960  # 20 ms at 48 kHz
LOUD_RMS = 1e-3


def reply_s(script: dict) -> float:
    return len(script["speech_values"]) * SPEECH_TOKEN_MS / 1000


def loud_s(pcm: np.ndarray) -> tuple[float, float]:
    """-> (s of 20 ms frames above LOUD_RMS, s from the first such frame to the last)."""
    frames = pcm[: pcm.size // FRAME * FRAME].reshape(-1, FRAME)  # (n_frames, 960)
    loud = np.flatnonzero(np.sqrt(np.mean(frames**2, axis=1)) > LOUD_RMS)
    if loud.size == 0:
        return 0.0, 0.0
    return loud.size * FRAME / WIRE_RATE_HZ, (loud[-1] - loud[0] + 1) * FRAME / WIRE_RATE_HZ


async def run_cli(*args: str, timeout_s: float = 90.0) -> tuple[int, list[dict], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.cli",
        "call",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    return proc.returncode, events, err.decode()


async def test_cli_spoken_turn_gives_reply_wav_and_transcript(glm_server, script, tmp_path):
    mic = tmp_path / "mic.wav"
    speech = synth_speech("Hello, can you hear me?")
    write_wav(
        mic, np.concatenate([np.zeros(8_000, np.float32), speech, np.zeros(24_000, np.float32)]), 16_000
    )
    out = tmp_path / "reply.wav"
    code, events, err = await run_cli(glm_server.base_url, "--wav", str(mic), "--out", str(out), "--json")
    assert code == 0, err
    turns = [e for e in events if e["type"] == "client.turn"]
    assert len(turns) == 1, [e["type"] for e in events]
    assert turns[0]["status"] == "completed" and turns[0]["transcript"] == MESSAGE
    user = [e for e in events if e["type"] == "client.user_turn"]
    assert user[0]["kind"] == "spoken" and abs(user[0]["duration_s"] - speech.size / 16_000) < 0.6
    for stage in ("speech_stopped", "prefill_done", "first_speech_token", "first_frame_sent"):
        assert stage in turns[0]["stages_ms"], stage
    assert turns[0]["first_audio_heard_ms"] >= turns[0]["stages_ms"]["first_frame_sent"] - 50
    assert events[-1] == {"type": "client.exit", "code": 0, "message": "done"}
    with wave.open(str(out)) as w:
        assert w.getframerate() == WIRE_RATE_HZ and w.getnchannels() == 1
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    expected = reply_s(script)
    loud, extent = loud_s(pcm)
    print(f"reply: {loud:.2f} s of audio over {extent:.2f} s (script {expected:.2f} s)")
    assert 0.85 * expected <= loud <= 1.1 * expected + 0.2, (loud, expected)
    assert abs(turns[0]["heard_audio_ms"] / 1000 - extent) < 0.3


async def test_push_to_talk_commits_on_release(glm_server, script):
    mic = ScriptedMic()
    speaker = Speaker()
    call, rec, task = start_call(CallOptions(glm_server.base_url, mode="push_to_talk"), mic, speaker)
    try:
        created = await rec.wait_for("session.created", 20)
        assert created["session"]["audio"]["input"]["turn_detection"] is None  # no server VAD
        await asyncio.sleep(0.5)  # released: this silence must not become part of the turn
        call.toggle_talk()
        speech_s = mic.play(synth_speech("What is the weather like today?"), 16_000)
        await asyncio.wait_for(mic.drained.wait(), speech_s + 5)
        mark = len(rec.events)
        call.toggle_talk()
        committed = await rec.wait_for("input_audio_buffer.committed", 10, after=mark)
        assert rec.events.index(committed) > mark
        turn = await rec.wait_for("client.turn", 40, after=mark)
        assert turn["status"] == "completed" and turn["transcript"] == MESSAGE
        assert turn["heard_audio_ms"] / 1000 >= 0.85 * reply_s(script)
        assert not rec.of_type("input_audio_buffer.speech_started")
        assert not rec.of_type("error"), rec.of_type("error")
    finally:
        call.stop()
        assert (await task)[0] == 0


async def _echo_call(base_url: str, mode: str, speech: np.ndarray) -> tuple[dict, dict, list[dict]]:
    """One spoken turn whose reply comes back into the microphone at -10 dB, then a second turn.
    -> (the first reply's client.turn, the second's, every event)."""
    mic = ScriptedMic()
    echo = EchoPath(mic, gain_db=-10.0)
    call, rec, task = start_call(CallOptions(base_url, mode=mode), echo, echo)
    try:
        await rec.wait_for("session.created", 20)
        mic.play(np.concatenate([speech, np.zeros(16_000, np.float32)]), 16_000)
        first = await rec.wait_for("client.turn", 60)
        mark = len(rec.events)
        mic.play(np.concatenate([speech, np.zeros(16_000, np.float32)]), 16_000)
        second = await rec.wait_for("client.turn", 60, after=mark)
        return first, second, rec.events
    finally:
        call.stop()
        await task


async def test_half_duplex_has_no_barge_in_from_its_own_echo(echo_server):
    # The echo responder, because its reply is speech (the user's own turn played back): the demo weights'
    # babble at -10 dB does not register as speech with silero-vad, so it could not show an echo problem.
    speech = synth_speech("Hello, can you hear me? Tell me about the weather.")
    speech_s = speech.size / 16_000
    # control: hands-free over the same echo path, so the echo is known to be loud enough to barge in
    control, _, _ = await _echo_call(echo_server.base_url, "hands_free", speech)
    assert control["cut_off"] == "turn_detected", "the simulated echo did not reach the server's VAD"
    first, second, events = await _echo_call(echo_server.base_url, "half_duplex", speech)
    started = next(i for i, e in enumerate(events) if e["type"] == "output_audio_buffer.started")
    turn_end = next(i for i, e in enumerate(events) if e["type"] == "client.turn")
    assert not [e for e in events[started:turn_end] if e["type"] == "input_audio_buffer.speech_started"]
    assert first["cut_off"] is None and first["status"] == "completed"
    assert first["heard_audio_ms"] / 1000 >= 0.8 * speech_s  # all of it played
    # the microphone opened again after the reply: the second turn was heard and answered in full
    assert second["status"] == "completed" and second["cut_off"] is None
    assert second["heard_audio_ms"] / 1000 >= 0.8 * speech_s


async def test_server_restart_mid_call_reconnects(demo_dir, script):
    running = await serve_glm(demo_dir)
    port = int(running.base_url.rsplit(":", 1)[1])
    mic = ScriptedMic()
    call, rec, task = start_call(CallOptions(running.base_url, reconnect_window_s=60.0), mic, Speaker())
    try:
        first_call = (await rec.wait_for("client.connected", 20))["call_id"]
        mic.play(np.concatenate([synth_speech("Hello there."), np.zeros(16_000, np.float32)]), 16_000)
        assert (await rec.wait_for("client.turn", 60))["status"] == "completed"
        mark = len(rec.events)
        await running.runner.cleanup()  # the server goes away: its calls close, the port is free
        running = await serve_glm(demo_dir, port)
        lost = await rec.wait_for("client.lost", 20, after=mark)
        again = await rec.wait_for("client.connected", 60, after=mark, connection=2)
        assert again["call_id"] != first_call, lost
        mark = len(rec.events)
        mic.play(np.concatenate([synth_speech("Are you back?"), np.zeros(16_000, np.float32)]), 16_000)
        turn = await rec.wait_for("client.turn", 60, after=mark)
        assert turn["status"] == "completed" and turn["transcript"] == MESSAGE
        assert turn["heard_audio_ms"] / 1000 >= 0.85 * reply_s(script)
        # the new server never saw the token: a fresh conversation, and it says so
        assert (await rec.wait_for("glm4voice.session.resume_failed", 5))["reason"] == "unknown"
    finally:
        call.stop()
        assert (await task)[0] == 0
        await running.runner.cleanup()


async def test_network_drop_resumes_the_conversation(echo_server):
    """Resume (docs/client.md): the client's peer connection dies without a hangup; it reconnects with the
    resume token from session.created and the server continues the same conversation."""
    mic = ScriptedMic()
    call, rec, task = start_call(CallOptions(echo_server.base_url, reconnect_window_s=30.0), mic, Speaker())
    try:
        first_call = (await rec.wait_for("client.connected", 20))["call_id"]
        token = (await rec.wait_for("session.created", 5))["resume_token"]
        assert call.resume_token == token
        mic.play(np.concatenate([synth_speech("Hello there."), np.zeros(16_000, np.float32)]), 16_000)
        assert (await rec.wait_for("client.turn", 60))["status"] == "completed"
        session = echo_server.server.calls[first_call].session
        mark = len(rec.events)
        await call._conn.pc.close()  # the network path goes; nobody hangs up
        await rec.wait_for("client.lost", 10, after=mark)
        again = await rec.wait_for("client.connected", 30, after=mark, connection=2)
        resumed = await rec.wait_for("glm4voice.session.resumed", 5, after=mark)
        assert resumed["items"] == 2
        assert echo_server.server.calls[again["call_id"]].session is session
        assert call.resume_token not in (None, token)  # the resumed call's own, for the next drop
        mark = len(rec.events)
        mic.play(np.concatenate([synth_speech("Are you back?"), np.zeros(16_000, np.float32)]), 16_000)
        assert (await rec.wait_for("client.turn", 60, after=mark))["status"] == "completed"
        assert [e.role for e in session.history] == ["user", "assistant"] * 2
    finally:
        call.stop()
        assert (await task)[0] == 0

"""A real call over loopback WebRTC with the echo responder: VAD events, echo by cross-correlation,
barge-in."""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest
import soxr

from tests.helpers.rtc_client import RATE_48K, RealtimeClient, xcorr_peak
from tests.helpers.speech import ENGLISH_SENTENCES, MANDARIN_PINYIN, have_speech_tools, synth_speech

# make test installs espeak-ng and sox; their absence is a failure, not a skip.
assert have_speech_tools(), "espeak-ng and sox are needed (make test installs them)"

SILENCE_TAIL_S = 1.2  # more than silence_duration_ms so the turn ends


async def _talk_and_get_echo(client: RealtimeClient, pcm16k: np.ndarray) -> tuple[dict, np.ndarray]:
    start = len(client.events)
    client.mic.play(np.concatenate([pcm16k, np.zeros(int(SILENCE_TAIL_S * 16_000), np.float32)]), 16_000)
    await client.wait_for("input_audio_buffer.speech_started", 10, after=start)
    stopped = await client.wait_for("input_audio_buffer.speech_stopped", 20, after=start)
    await client.wait_for("input_audio_buffer.committed", 5, after=start)
    created = await client.wait_for("response.created", 5, after=start)
    started = await client.wait_for("output_audio_buffer.started", 5, after=start)
    assert started["response_id"] == created["response"]["id"]
    await client.wait_for("output_audio_buffer.stopped", pcm16k.size / 16_000 + 10, after=start)
    done = await client.wait_for("response.done", 5, after=start)
    assert done["response"]["status"] == "completed"
    since = client.event_time(started) - 0.2
    await asyncio.sleep(0.3)  # the last frames are in flight
    return stopped, client.heard_pcm(since)


@pytest.mark.parametrize(
    "voice,text",
    [("en", ENGLISH_SENTENCES[0]), ("cmn-latn-pinyin", MANDARIN_PINYIN[0])],
    ids=["english", "mandarin"],
)
async def test_speech_is_detected_and_echoed(echo_server, voice, text):
    speech = synth_speech(text, voice=voice)
    client = RealtimeClient(echo_server.base_url)
    await client.connect()
    try:
        created = await client.wait_for("session.created", 5)
        assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        # webrtc.host_addresses = ["127.0.0.1"]: the answer offers loopback host candidates only.
        candidates = re.findall(
            r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ (\w+)", client.answer_sdp, re.MULTILINE
        )
        assert candidates and all(c == ("127.0.0.1", "host") for c in candidates), candidates
        stopped, heard = await _talk_and_get_echo(client, speech)
        started = client.of_type("input_audio_buffer.speech_started")[0]
        # The turn spans the speech: onset near the start of the clip, end after it.
        assert stopped["audio_end_ms"] - started["audio_start_ms"] >= 0.8 * speech.size / 16
        transcript = "".join(e["delta"] for e in client.of_type("response.output_audio_transcript.delta"))
        assert "Mic check" in transcript
        assert client.of_type("response.output_audio_transcript.done")[0]["transcript"] == transcript
        # The echo is our speech: find the clip inside what came back (both at 48 kHz).
        reference = soxr.resample(speech, 16_000, RATE_48K)
        assert heard.size > reference.size * 0.9, "reply shorter than the turn"
        peak, lag = xcorr_peak(reference, heard)
        assert peak > 0.6, f"echo does not match the spoken clip (normalised xcorr peak {peak:.2f})"
        latency = client.of_type("glm4voice.turn.latency")[0]
        assert latency["stages_ms"]["speech_stopped"] == 0.0
        assert latency["speech_stopped_to_first_frame_ms"] >= 0.0
        # Silence where nothing was said: the reply is not just noise everywhere.
        assert np.sqrt(np.mean(heard[:lag] ** 2)) < 0.01 if lag > 4_800 else True
    finally:
        assert await client.hangup() == 200
    assert echo_server.server.calls == {}


async def test_barge_in_stops_playback_and_reports_played_ms(echo_server):
    first = synth_speech(ENGLISH_SENTENCES[1], voice="en")  # a long turn, so a long echo to talk over
    interruption = synth_speech("Stop, stop. Wait a moment please.", voice="en")
    client = RealtimeClient(echo_server.base_url)
    await client.connect()
    try:
        client.mic.play(np.concatenate([first, np.zeros(int(SILENCE_TAIL_S * 16_000), np.float32)]), 16_000)
        started = await client.wait_for("output_audio_buffer.started", 30)
        await asyncio.sleep(1.0)  # let a second of the echo play
        mark = len(client.events)
        client.mic.play(interruption, 16_000)
        cleared = await client.wait_for("output_audio_buffer.cleared", 10, after=mark)
        cancelled = await client.wait_for("glm4voice.response.cancelled", 5, after=mark)
        assert cleared["response_id"] == started["response_id"] == cancelled["response_id"]
        assert cancelled["reason"] == "turn_detected"
        # The echo finishes "generating" at once, so its response.done may precede the cut; either way
        # exactly one response.done is sent for the reply.
        await asyncio.sleep(0.2)
        done = [e for e in client.of_type("response.done") if e["response"]["id"] == started["response_id"]]
        assert len(done) == 1
        # played_ms: about the time between playback start and the cut, never the whole reply.
        t_started, t_cleared = client.event_time(started), client.event_time(cleared)
        elapsed_ms = (t_cleared - t_started) * 1000
        assert 0.5 * elapsed_ms < cancelled["played_ms"] < elapsed_ms + 200
        assert cancelled["played_ms"] < first.size / 16
        # Playback stops within 100 ms of the server's decision: every frame that arrives more than
        # 100 ms after the `cleared` event is silent (until the echo of the interruption itself begins).
        await asyncio.sleep(0.5)
        next_started = [e for e in client.events[mark:] if e["type"] == "output_audio_buffer.started"]
        until = client.event_time(next_started[0]) if next_started else time.monotonic()
        late = [
            f for f, t in zip(client.heard, client.heard_times, strict=True) if t_cleared + 0.1 < t < until
        ]
        assert late, "no audio frames after the cut were received"
        loud = [
            t
            for f, t in zip(client.heard, client.heard_times, strict=True)
            if t_started < t < until and np.abs(f).max() >= 0.01
        ]
        loudest = max(float(np.abs(f).max()) for f in late)
        print(
            f"barge-in: last audible frame arrived {(loud[-1] - t_cleared) * 1000:+.0f} ms after the cleared "
            "event"
        )
        print(f"barge-in: loudest frame received > 100 ms after output_audio_buffer.cleared: {loudest:.4f}")
        assert loudest < 0.01, "reply audio kept playing after the barge-in"
        # The responder kept only what was heard.
        session = next(iter(echo_server.server.calls.values())).session
        assistant = [h for h in session.history if h.role == "assistant"]
        assert abs(assistant[0].audio_ms - cancelled["played_ms"]) <= 1.0
    finally:
        await client.hangup()


async def test_push_to_talk_with_turn_detection_off(echo_server):
    speech = synth_speech("Push to talk.", voice="en")
    client = RealtimeClient(echo_server.base_url)
    await client.connect()
    try:
        client.send({"type": "input_audio_buffer.commit", "event_id": "e1"})
        error = await client.wait_for("error", 5)
        assert error["error"]["code"] == "turn_detection_enabled"
        client.send({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
        updated = await client.wait_for("session.updated", 5)
        assert updated["session"]["audio"]["input"]["turn_detection"] is None
        client.mic.play(np.full(16_000, 0.1, np.float32), 16_000)  # noise the client then clears
        await asyncio.sleep(1.2)
        client.send({"type": "input_audio_buffer.clear"})
        await client.wait_for("input_audio_buffer.cleared", 5)
        mark = len(client.events)
        duration_s = client.mic.play(speech, 16_000)
        await asyncio.sleep(duration_s + 0.3)
        client.send({"type": "input_audio_buffer.commit"})
        client.send({"type": "response.create"})
        await client.wait_for("input_audio_buffer.committed", 5, after=mark)
        started = await client.wait_for("output_audio_buffer.started", 5, after=mark)
        await client.wait_for("output_audio_buffer.stopped", 10, after=mark)
        assert not [e for e in client.events[mark:] if e["type"].startswith("input_audio_buffer.speech")]
        await asyncio.sleep(0.2)
        heard = client.heard_pcm(client.event_time(started) - 0.1)
        peak, _ = xcorr_peak(soxr.resample(speech, 16_000, RATE_48K), heard)
        assert peak > 0.6, f"push-to-talk echo does not match (xcorr peak {peak:.2f})"
        # Only what came after the clear was echoed: about speech + 0.3 s, not the cleared noise too.
        transcript = client.of_type("response.output_audio_transcript.done")[-1]["transcript"]
        heard_s = float(transcript.split("heard ")[1].split(" s")[0])
        assert duration_s < heard_s < duration_s + 0.8, transcript
    finally:
        await client.hangup()

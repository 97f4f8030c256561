"""Unit tests of the call path's parts: config, torch-free imports, VAD, turn detection, media."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soxr

from server.audio.turns import CHUNK_MS, SpeechStarted, SpeechStopped, TurnDetector, TurnSettings
from server.audio.vad import CHUNK_SAMPLES, SileroVad, VadState
from server.config import load_config
from server.webrtc.media import FRAME_SAMPLES, OUT_RATE_HZ, InboundConverter, OutboundAudioTrack

ROOT = Path(__file__).resolve().parents[2]


def test_server_never_imports_torch():
    code = (
        "import sys; import server.app, server.cli, server.call.call, server.webrtc.media, "
        "server.audio.vad, server.audio.turns, "
        "server.echo, server.responders; from server.config import load_config; "
        "from server.app import create_app; create_app(load_config(None, env={}, "
        "overrides={'responder': {'kind': 'echo'}})); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_file_env_and_errors(tmp_path):
    config = load_config(None, env={})
    assert config.turn_detection.threshold == 0.5 and config.turn_detection.prefix_padding_ms == 300
    assert config.turn_detection.silence_duration_ms == 500 and config.responder.kind == "glm4voice"
    shipped = load_config(
        ROOT / "config.toml", env={}
    )  # the documented file is valid, its values the defaults
    assert shipped == config
    text = (ROOT / "config.toml").read_text()
    for section in ("http", "webrtc", "turn_detection", "responder", "limits", "metrics"):
        for name in dataclasses.asdict(getattr(config, section)):
            assert re.search(rf"^{name} = ", text, re.MULTILINE), (
                f"config.toml does not document [{section}].{name}"
            )
    path = tmp_path / "c.toml"
    path.write_text(
        '[webrtc]\nhost_addresses = ["10.0.0.2"]\n[turn_detection]\nsilence_duration_ms = 800\n'
        '[model]\ndevice = "cpu"\n'
    )
    env = {
        "GLM4VOICE_WEBRTC_HOST_ADDRESSES": "127.0.0.1, ::1",
        "GLM4VOICE_TURN_DETECTION_THRESHOLD": "0.6",
        "GLM4VOICE_MODEL_REQUIRE_WEIGHTS": "yes",
        "GLM4VOICE_PARITY_DIR": "/elsewhere",
    }
    config = load_config(path, env=env, overrides={"http": {"port": 9000, "host": None}})
    assert config.webrtc.host_addresses == ("127.0.0.1", "::1")  # env beats the file
    assert config.turn_detection.silence_duration_ms == 800 and config.turn_detection.threshold == 0.6
    assert config.model.device == "cpu" and config.model.require_weights is True
    assert config.http.port == 9000 and config.http.host == "127.0.0.1"
    for text, message in [
        ("[webrtc]\nhost_adresses = []\n", "unknown key"),
        ("[nope]\nx = 1\n", "unknown section"),
        ("[http]\nport = 'eighty'\n", "[http].port"),
        ("[turn_detection]\nthreshold = 2.0\n", "threshold"),
        ("[http\n", "not valid TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(path, env={})
    with pytest.raises(ValueError, match="GLM4VOICE|turn_detection"):
        load_config(None, env={"GLM4VOICE_TURN_DETECTION_MIN_SPEECH_MS": "soon"})


def test_vad_matches_the_silero_package():
    """Our torch-free wrapper computes what silero_vad's own OnnxWrapper computes on real speech."""
    from tests.helpers.speech import have_speech_tools, synth_speech

    if not have_speech_tools():
        pytest.skip("espeak-ng and sox are needed")
    import torch

    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad

    torch.set_num_threads(threads)  # importing silero_vad sets torch to one thread
    reference = load_silero_vad(onnx=True)
    speech = synth_speech("Testing the voice activity detector.")
    audio = np.concatenate([np.zeros(8_000, np.float32), speech, np.zeros(8_000, np.float32)])
    ours, state = SileroVad(), VadState()
    got, want = [], []
    for start in range(0, audio.size - CHUNK_SAMPLES + 1, CHUNK_SAMPLES):
        chunk = audio[start : start + CHUNK_SAMPLES]
        got.append(ours.probability(state, chunk))
        want.append(float(reference(torch.from_numpy(chunk.copy()), 16_000)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert max(got) > 0.9 and got[0] < 0.1  # speech is found, leading silence is not speech


def _run_detector(probabilities: list[float], settings: TurnSettings) -> tuple[list[object], int]:
    detector, events, pushed = TurnDetector(settings), [], 0
    for p in probabilities:
        new, audio = detector.feed(np.full(CHUNK_SAMPLES, p, np.float32), p)
        events += new
        pushed += len(audio)
    return events, pushed


def test_turn_detector_padding_silence_and_min_speech():
    settings = TurnSettings(threshold=0.5, prefix_padding_ms=96, silence_duration_ms=160, min_speech_ms=250)
    speech_chunks = 20
    probs = [0.0] * 10 + [0.9] * speech_chunks + [0.0] * 10
    events, pushed = _run_detector(probs, settings)
    started, stopped = events
    assert isinstance(started, SpeechStarted) and isinstance(stopped, SpeechStopped)
    assert started.audio_start_ms == pytest.approx((10 - 3) * CHUNK_MS)  # 3 chunks of padding = 96 ms
    assert stopped.speech_ms == pytest.approx(speech_chunks * CHUNK_MS) and not stopped.too_short
    assert stopped.audio_end_ms == pytest.approx(
        (10 + speech_chunks + 5) * CHUNK_MS
    )  # 160 ms of silence = 5 chunks
    assert pushed == 3 + speech_chunks + 5  # padding + speech + the silence until the decision
    # Hysteresis: dips between threshold-0.15 and threshold do not end the turn.
    events, _ = _run_detector([0.9] * 5 + [0.4] * 20 + [0.9] * 5 + [0.0] * 10, settings)
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    # A cough: shorter than min_speech_ms.
    events, _ = _run_detector([0.0] * 3 + [0.9] * 4 + [0.0] * 10, settings)
    assert events[1].too_short
    # turn_detection null (push-to-talk): nothing is detected, everything is turn audio.
    events, pushed = _run_detector(probs, TurnSettings(enabled=False))
    assert events == [] and pushed == len(probs)


def _frame(pcm48_stereo: np.ndarray) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(pcm48_stereo.reshape(1, -1), format="s16", layout="stereo")
    frame.sample_rate = 48_000
    return frame


def test_inbound_converter_downmixes_and_resamples():
    t = np.arange(48_000) / 48_000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    stereo = np.stack([tone, tone], axis=1)  # (N, 2) interleaved
    converter, chunks = InboundConverter(), []
    for start in range(0, 48_000, 960):
        chunks += converter.push(_frame(stereo[start : start + 960]))
    out = np.concatenate(chunks)
    assert all(c.shape == (CHUNK_SAMPLES,) and c.dtype == np.float32 for c in chunks)
    assert abs(out.size - 16_000) <= CHUNK_SAMPLES + 16 * 8  # what soxr holds back: < 8 ms
    expected = soxr.resample((tone / 32768.0).astype(np.float32), 48_000, 16_000)
    spectrum = np.abs(np.fft.rfft(out[2000:14000]))
    assert np.argmax(spectrum) * 16_000 / 12_000 == pytest.approx(440, abs=2)
    assert np.sqrt(np.mean(out[2000:14000] ** 2)) == pytest.approx(
        np.sqrt(np.mean(expected[2000:14000] ** 2)), rel=0.02
    )


async def test_outbound_track_paces_resamples_counts_and_clears():
    started, stopped = [], []
    track = OutboundAudioTrack(on_started=lambda rid, t: started.append(rid), on_stopped=stopped.append)
    frame = await track.recv()  # idle: silence
    assert (
        frame.samples == FRAME_SAMPLES
        and frame.sample_rate == OUT_RATE_HZ
        and frame.time_base == Fraction(1, 48_000)
    )
    assert not np.any(frame.to_ndarray())
    rate = 22_050  # the GLM-4-Voice vocoder's rate
    tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(rate) / rate)).astype(np.float32)  # 1 s
    track.begin_reply("r1")
    for start in range(0, rate, 2205):
        track.push(tone[start : start + 2205], rate)
    track.end_reply()
    t0 = time.monotonic()
    frames = [await track.recv() for _ in range(60)]  # 1.2 s of frames: the whole reply and then silence
    elapsed = time.monotonic() - t0
    assert elapsed == pytest.approx(60 * 0.02, abs=0.1)  # paced by the clock, not as fast as asked
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32) / 32767
    assert np.count_nonzero(np.abs(pcm) > 0.01) / 48_000 == pytest.approx(1.0, abs=0.03)
    assert started == ["r1"] and stopped == ["r1"] and track.played_ms == pytest.approx(1000, abs=25)
    assert [f.pts for f in frames] == list(range(frames[0].pts, frames[0].pts + 60 * 960, 960))
    # clear(): the very next frame is silent, and played ms says how much went out.
    track.begin_reply("r2")
    track.push(tone, rate)
    for _ in range(10):
        await track.recv()
    played = track.clear()
    assert played == pytest.approx(200, abs=1)
    assert not np.any((await track.recv()).to_ndarray())
    track.push(tone, rate)  # a late chunk of the cleared reply is ignored
    assert not np.any((await track.recv()).to_ndarray())
    track.stop()


async def test_outbound_track_does_not_burst_after_a_stall():
    track = OutboundAudioTrack()
    await track.recv()
    time.sleep(0.5)  # the loop stalls for 25 frames
    t0 = time.monotonic()
    for _ in range(5):
        await track.recv()
    assert time.monotonic() - t0 >= 0.07  # paced again right away, not 25 frames at once
    await asyncio.sleep(0)


def _packet(seq: int, payload: bytes = b"x"):
    from aiortc.rtp import RtpPacket

    packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * 960)
    packet._data = payload
    return packet


def test_in_order_jitter_buffer_releases_at_once_and_drops_late_packets():
    from server.webrtc.rtc import InOrderAudioJitterBuffer

    buffer = InOrderAudioJitterBuffer(lambda _duration_s: True, frozenset({111}))
    released = [buffer.add(_packet(seq))[1] for seq in (65534, 65535, 0, 2)]  # wraps; 1 is lost
    assert [f.timestamp for f in released] == [65534 * 960, 65535 * 960, 0, 2 * 960]
    assert buffer.add(_packet(1))[1] is None and buffer.add(_packet(2))[1] is None  # late, duplicate
    assert buffer.late_packets == 2
    assert buffer.add(_packet(3))[1].data == b"x"


def test_remote_candidate_filter_and_offer_checks():
    from server.webrtc.rtc import SdpError, check_offer, filter_remote_candidates

    sdp = (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"
        "a=ice-ufrag:u\r\na=ice-pwd:p\r\na=fingerprint:sha-256 00:01\r\n"
        "a=candidate:1 1 udp 2113937151 127.0.0.1 5000 typ host\r\n"
        "a=candidate:2 1 udp 2113937151 192.168.1.7 5001 typ host\r\n"
        "a=candidate:3 1 udp 2113937151 abcd-1234.local 5002 typ host\r\n"
    )
    kept, dropped = filter_remote_candidates(sdp, ("127.0.0.1",))
    assert dropped == 2 and "127.0.0.1 5000" in kept and "192.168.1.7" not in kept and ".local" not in kept
    kept, dropped = filter_remote_candidates(sdp, ("10.0.0.5",))
    assert dropped == 1 and "127.0.0.1" not in kept and "192.168.1.7" in kept and ".local" in kept
    assert filter_remote_candidates(sdp, ()) == (sdp, 0)
    check_offer(sdp)
    for bad, code in [
        ("", "invalid_sdp"),
        ("hello", "invalid_sdp"),
        ("v=0\r\nm=video 9 RTP/AVP 96\r\n", "no_audio"),
        ("v=0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n", "no_opus"),
        (sdp.replace("a=fingerprint:sha-256 00:01\r\n", ""), "invalid_sdp"),
    ]:
        with pytest.raises(SdpError) as info:
            check_offer(bad)
        assert info.value.code == code

"""Transcription: Whisper's time per second of speech, and the reply's first-audio delay with it on and off.

One run, one engine (demo weights on the CPU by default; ~2 min on 2 cores):
1. Whisper alone: each clip length transcribed `--repeats` times; compute time per second of speech
   (real-time factor), and per generated token (random weights babble up to 224 tokens a window, so with
   demo weights the token count, not the audio, sets the time).
2. The engine with the stage loaded: back-to-back spoken turns of one call (the next turn is committed as
   soon as the reply has ended, so the previous turn's transcript may still be running: the worst case),
   interleaved between sessions with transcription off, on, and on without the first-audio wait (the
   worker starts at once). Commit -> first audio chunk, p50/p95 per mode, and the ratio to off.

  .venv/bin/python bench/bench_transcription.py                      # demo weights, CPU
  .venv/bin/python bench/bench_transcription.py --whisper DIR        # a real Whisper checkpoint folder
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.engine.config import EngineConfig  # noqa: E402
from pipeline.engine.thread import GLMVoiceResponder  # noqa: E402
from pipeline.responder import (  # noqa: E402
    AudioChunk,
    ReplyDone,
    ReplyError,
    SessionSettings,
    TranscriptDone,
    TranscriptFailed,
    TranscriptionSettings,
)
from pipeline.transcription.config import TranscriptionConfig  # noqa: E402
from tests.helpers.engine import settled  # noqa: E402

MODES = ("off", "on", "on, no first-audio wait")


def machine() -> str:
    import torch

    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))  # noqa: E741
    except (OSError, StopIteration):
        cpu = platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; load avg {os.getloadavg()[0]:.1f}; "
        f"torch {torch.__version__}; commit {commit.stdout.strip()}"
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def speech(seconds: float, seed: int) -> np.ndarray:
    """A voiced-like signal (150 Hz buzz with noise): the demo models take any audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 150 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def whisper_alone(model, clips_s: list[float], repeats: int) -> None:
    print("\n1. Whisper alone (language set: no detection pass)")
    print(f"{'speech s':>9} {'compute s':>10} {'s per s of speech':>18} {'tokens':>7} {'ms per token':>13}")
    for seconds in clips_s:
        runs = [model.transcribe(speech(seconds, seed=r), language="en") for r in range(repeats)]
        compute = statistics.median(r.compute_s for r in runs)
        tokens = statistics.median(r.tokens for r in runs)
        print(
            f"{seconds:>9.1f} {compute:>10.3f} {compute / seconds:>18.3f} {tokens:>7.0f} "
            f"{1e3 * compute / tokens:>13.2f}"
        )


async def one_turn(responder, session, pcm: np.ndarray) -> float:
    """Commit -> the first audio chunk of the reply, in seconds."""
    for start in range(0, pcm.size, 512):
        session.push_audio(pcm[start : start + 512])
    await settled(responder.engine)  # the speech tokenizer has caught up, as it does in a live call
    t0 = time.monotonic()
    session.commit_audio()
    first = None
    async for event in session.respond().events():
        if isinstance(event, AudioChunk) and first is None:
            first = time.monotonic() - t0
        if isinstance(event, ReplyError):
            raise RuntimeError(event.message)
    assert isinstance(event, ReplyDone) and first is not None
    return first


async def first_audio(responder, rounds: int, turns: int, turn_s: float) -> None:
    worker = responder.engine.scheduler.transcription
    gate = worker.first_audio_clear
    always = threading.Event()
    always.set()
    on = SessionSettings(transcription=TranscriptionSettings(language="en"))
    sessions = {
        mode: responder.open_session(mode, on if mode != "off" else SessionSettings()) for mode in MODES
    }
    streams = {mode: sessions[mode].transcripts() for mode in MODES}
    delays: dict[str, list[float]] = {mode: [] for mode in MODES}
    transcribed = {mode: 0 for mode in MODES}
    for r in range(rounds):
        for mode in MODES:
            worker.first_audio_clear = always if mode == MODES[2] else gate
            for turn in range(turns):
                pcm = speech(turn_s, seed=r * turns + turn)
                delays[mode].append(await one_turn(responder, sessions[mode], pcm))
            if mode != "off":  # this mode's transcripts end before the next mode's turns start
                for _ in range(turns):
                    while not isinstance(await anext(streams[mode]), TranscriptDone | TranscriptFailed):
                        pass
                    transcribed[mode] += 1
    worker.first_audio_clear = gate
    for session in sessions.values():
        await session.close()
    n = rounds * turns
    print(
        f"\n2. Commit -> first audio: {n} turns of {turn_s:.1f} s per mode "
        f"({rounds} rounds of {turns} back-to-back)"
    )
    print(f"{'mode':<24} {'p50 ms':>8} {'p95 ms':>8} {'p50 / off':>10} {'transcripts':>12}")
    base = statistics.median(delays["off"])
    for mode in MODES:
        p50 = statistics.median(delays[mode])
        p95 = pct(delays[mode], 0.95)
        print(f"{mode:<24} {1e3 * p50:>8.0f} {1e3 * p95:>8.0f} {p50 / base:>10.2f} {transcribed[mode]:>12}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--whisper", default="", help="a Whisper checkpoint folder (default: the demo one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clips", type=float, nargs="+", default=[2.0, 10.0], help="seconds")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--turns", type=int, default=3, help="back-to-back turns per mode and round")
    parser.add_argument("--turn-s", type=float, default=3.0)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        demo = os.environ.get("GLM4VOICE_MODEL_DEMO_WEIGHTS_DIR", tmp + "/demo")
        engine = EngineConfig(demo_weights_dir=demo, device=args.device)
        transcription = TranscriptionConfig(enabled="on", model=args.whisper or TranscriptionConfig.model)
        responder = GLMVoiceResponder(engine, transcription=transcription)
        await responder.start()
        model = responder.engine.scheduler.transcription.model
        print(f"whisper: {responder.info().details['transcription']}")
        whisper_alone(model, args.clips, args.repeats)
        await first_audio(responder, args.rounds, args.turns, args.turn_s)
        await responder.stop()


if __name__ == "__main__":
    asyncio.run(main())

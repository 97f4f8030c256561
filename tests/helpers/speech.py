"""Real test speech made at test time with espeak-ng + sox (Debian packages `make test` installs)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np


def have_speech_tools() -> bool:
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def synth_speech(
    text: str, voice: str = "en", sample_rate_hz: int = 16_000, speed_wpm: int = 160
) -> np.ndarray:
    """Speak `text` with espeak-ng and return mono float32 at `sample_rate_hz`.

    Mandarin: voice "cmn-latn-pinyin" with tone-numbered pinyin, e.g. "ni3 hao3".
    """
    if not have_speech_tools():
        raise RuntimeError("espeak-ng and sox are required (make test installs them)")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        out = Path(tmp) / "out.raw"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed_wpm), "-w", str(raw), text],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                "sox",
                str(raw),
                "-r",
                str(sample_rate_hz),
                "-c",
                "1",
                "-b",
                "16",
                "-e",
                "signed-integer",
                "-t",
                "raw",
                str(out),
            ],
            check=True,
            capture_output=True,
        )
        pcm = np.frombuffer(out.read_bytes(), dtype="<i2")
    return (pcm.astype(np.float32) / 32768.0).copy()


def write_wav(path: Path, pcm: np.ndarray, sample_rate_hz: int) -> None:
    """Write mono float32 PCM as a 16-bit WAV (for fake-microphone files)."""
    import wave

    data = np.clip(pcm, -1.0, 1.0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate_hz)
        w.writeframes((data * 32767.0).astype("<i2").tobytes())


ENGLISH_SENTENCES = [
    "Hello, can you hear me? I would like to know the weather in Beijing tomorrow.",
    "Please tell me a short story about a cat who learns to play the piano.",
]
MANDARIN_PINYIN = [
    "ni3 hao3, qing3 gao4 su4 wo3 ming2 tian1 bei3 jing1 de5 tian1 qi4.",
    "wo3 xiang3 ting1 yi2 ge4 guan1 yu2 xiao3 mao1 de5 gu4 shi4.",
]

"""Where the call's audio comes from and goes to: the default microphone and speaker (sounddevice, i.e.
PortAudio) or WAV files. Everything here is mono float32 at the wire rate, 48 kHz.

Sources are pulled by the outbound track every 20 ms (`pull`); sinks are pushed each received frame. The
PortAudio callbacks run on PortAudio's thread, so the device classes hand audio over through a lock-guarded
buffer: nothing here waits on the event loop.
"""

from __future__ import annotations

import threading
import wave
from collections import deque
from pathlib import Path
from typing import Protocol

import numpy as np
import soxr

from client.errors import AudioDeviceError

WIRE_RATE_HZ = 48_000  # Opus on the wire (pipeline/audio_format.py WIRE_RATE_HZ; the client stays torch-free)
FRAME_SAMPLES = 960  # 20 ms at 48 kHz: one WebRTC audio frame
MAX_BUFFERED_MS = 200  # a device buffer longer than this drops its oldest audio: latency beats completeness


class AudioSource(Protocol):
    def pull(self, n: int) -> np.ndarray: ...  # (n,) float32; zeros where there is nothing to send

    @property
    def finished(self) -> bool: ...  # a file source has played to its end

    def close(self) -> None: ...


class AudioSink(Protocol):
    def push(self, pcm: np.ndarray) -> None: ...  # (n,) float32 at 48 kHz

    def close(self) -> None: ...


def read_wav(path: Path) -> np.ndarray:
    """A 16-bit PCM WAV (any rate, any channel count) as mono float32 at 48 kHz."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2:
                raise AudioDeviceError(
                    f"{path}: only 16-bit PCM WAV files are read (sample width {w.getsampwidth()})"
                )
            channels, rate = w.getnchannels(), w.getframerate()
            data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    except (OSError, EOFError, wave.Error) as exc:
        raise AudioDeviceError(f"cannot read {path}: {exc}") from None
    pcm = data.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0  # (samples,)
    return soxr.resample(pcm, rate, WIRE_RATE_HZ).astype(np.float32) if rate != WIRE_RATE_HZ else pcm


class WavSource:
    """Plays a WAV file once from the start of the first call, then silence."""

    def __init__(self, path: Path) -> None:
        self._pcm = read_wav(path)
        self._index = 0

    @property
    def duration_s(self) -> float:
        return self._pcm.size / WIRE_RATE_HZ

    @property
    def finished(self) -> bool:
        return self._index >= self._pcm.size

    def pull(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        chunk = self._pcm[self._index : self._index + n]
        out[: chunk.size] = chunk
        self._index += n
        return out

    def close(self) -> None:
        pass


class WavSink:
    """Writes everything the speaker would play, silence included, so the file is the call's timeline."""

    def __init__(self, path: Path) -> None:
        try:
            self._file = wave.open(str(path), "wb")
        except OSError as exc:
            raise AudioDeviceError(f"cannot write {path}: {exc}") from None
        self._file.setnchannels(1)
        self._file.setsampwidth(2)
        self._file.setframerate(WIRE_RATE_HZ)

    def push(self, pcm: np.ndarray) -> None:
        self._file.writeframes((np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())

    def close(self) -> None:
        self._file.close()


def _sounddevice():
    """Imported only for a real device, so WAV-only use (tests, servers) needs no PortAudio."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        raise AudioDeviceError(
            f"no audio device support: {exc} (install the libportaudio2 package, or use --wav/--out)"
        ) from None
    return sounddevice


def _device(spec: str | None) -> int | str | None:
    return int(spec) if spec is not None and spec.isdigit() else spec


class _Buffer:
    """Samples handed between PortAudio's thread and the event loop's, capped at MAX_BUFFERED_MS."""

    def __init__(self) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self._size = 0
        self._lock = threading.Lock()
        self._cap = WIRE_RATE_HZ * MAX_BUFFERED_MS // 1000

    def put(self, pcm: np.ndarray) -> None:
        with self._lock:
            self._chunks.append(pcm)
            self._size += pcm.size
            while self._size - self._chunks[0].size >= self._cap:
                self._size -= self._chunks.popleft().size

    def take(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        filled = 0
        with self._lock:
            while filled < n and self._chunks:
                head = self._chunks[0]
                k = min(n - filled, head.size)
                out[filled : filled + k] = head[:k]
                filled += k
                if k == head.size:
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[k:]
                self._size -= k
        return out


class MicSource:
    """The default (or named) microphone at 48 kHz mono."""

    finished = False

    def __init__(self, device: str | None = None) -> None:
        sd = _sounddevice()
        self._buffer = _Buffer()
        try:
            self._stream = sd.InputStream(
                samplerate=WIRE_RATE_HZ,
                channels=1,
                dtype="float32",
                blocksize=FRAME_SAMPLES,
                device=_device(device),
                callback=self._callback,
            )
            self._stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            raise AudioDeviceError(f"cannot open the microphone {device or '(default)'}: {exc}") from None

    def _callback(self, indata: np.ndarray, frames: int, time, status) -> None:  # PortAudio's thread
        self._buffer.put(indata[:, 0].copy())

    def pull(self, n: int) -> np.ndarray:
        return self._buffer.take(n)

    def close(self) -> None:
        self._stream.close()


class SpeakerSink:
    """The default (or named) speaker at 48 kHz mono; underruns play silence."""

    def __init__(self, device: str | None = None) -> None:
        sd = _sounddevice()
        self._buffer = _Buffer()
        try:
            self._stream = sd.OutputStream(
                samplerate=WIRE_RATE_HZ,
                channels=1,
                dtype="float32",
                blocksize=FRAME_SAMPLES,
                device=_device(device),
                callback=self._callback,
            )
            self._stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            raise AudioDeviceError(f"cannot open the speaker {device or '(default)'}: {exc}") from None

    def _callback(self, outdata: np.ndarray, frames: int, time, status) -> None:  # PortAudio's thread
        outdata[:, 0] = self._buffer.take(frames)

    def push(self, pcm: np.ndarray) -> None:
        self._buffer.put(pcm.astype(np.float32))

    def close(self) -> None:
        self._stream.close()


class SilentSource:
    """No microphone: typed turns only."""

    finished = True

    def pull(self, n: int) -> np.ndarray:
        return np.zeros(n, np.float32)

    def close(self) -> None:
        pass

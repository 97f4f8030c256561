"""Reply detection on the VAD's speech probabilities, with the Realtime `server_vad` knobs.

Pure and synchronous: `TurnDetector.feed(chunk, probability)` returns what happened in that 32 ms chunk.
Speech starts at the first chunk with probability >= threshold; it ends after `silence_duration_ms`
of chunks below a lower threshold (hysteresis, as silero's own iterator: threshold - 0.15), so a
word's soft tail does not end the turn. The `prefix_padding_ms` of audio before the onset goes out
first, so the responder hears the whole first syllable. Audio times are ms of input audio since the
call began, the unit of Realtime's `audio_start_ms` / `audio_end_ms`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from server.audio.vad import CHUNK_SAMPLES, SAMPLE_RATE_HZ

CHUNK_MS = CHUNK_SAMPLES * 1000 / SAMPLE_RATE_HZ  # 32 ms
HYSTERESIS = 0.15  # silero VADIterator: speech ends below threshold - 0.15


@dataclass(frozen=True)
class TurnSettings:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    min_speech_ms: int = 250
    min_interrupt_ms: int = 200
    create_response: bool = True
    interrupt_response: bool = True
    echo_guard: bool = False  # while our reply plays, inbound audio matching it is not speech (echo_guard.py)
    enabled: bool = True  # False: turn_detection null; the client commits turns (push-to-talk)


@dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: float  # includes the prefix padding


@dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: float  # includes the trailing silence
    speech_ms: float  # onset to last voiced chunk
    too_short: bool  # speech_ms < min_speech_ms: a false start, dropped without a reply


@dataclass
class TurnState:
    """One call's detector memory."""

    audio_ms: float = 0.0  # input audio seen so far
    speaking: bool = False
    onset_ms: float = 0.0  # first voiced chunk of the current turn
    last_voiced_ms: float = 0.0  # end of the last voiced chunk
    prefix: deque = field(default_factory=deque)  # (chunk,) float32 arrays before the onset

    def reset(self) -> None:
        self.audio_ms = 0.0
        self.speaking = False
        self.onset_ms = self.last_voiced_ms = 0.0
        self.prefix.clear()


class TurnDetector:
    def __init__(self, settings: TurnSettings) -> None:
        self.settings = settings
        self.state = TurnState()

    def update(self, settings: TurnSettings) -> None:
        self.settings = settings

    def abandon(self) -> None:
        """Forget a turn in progress (turn detection switched on or off); the audio clock runs on."""
        self.state.speaking = False
        self.state.prefix.clear()

    @property
    def speech_ms(self) -> float:
        """Voiced time of the turn in progress (0 when nobody speaks): the barge-in criterion."""
        return self.state.last_voiced_ms - self.state.onset_ms if self.state.speaking else 0.0

    def feed(self, chunk: np.ndarray, probability: float) -> tuple[list[object], list[np.ndarray]]:
        """One 512-sample chunk -> (events, audio to push to the responder for the pending turn)."""
        s, st = self.settings, self.state
        start_ms = st.audio_ms
        st.audio_ms += CHUNK_MS
        events: list[object] = []
        audio: list[np.ndarray] = []
        if not s.enabled:  # push-to-talk: everything is turn audio until the client commits or clears
            audio.append(chunk)
            return events, audio
        if not st.speaking:
            if probability >= s.threshold:
                st.speaking = True
                st.onset_ms = start_ms
                st.last_voiced_ms = st.audio_ms
                padding_ms = len(st.prefix) * CHUNK_MS
                events.append(SpeechStarted(audio_start_ms=start_ms - padding_ms))
                audio.extend(st.prefix)
                audio.append(chunk)
                st.prefix.clear()
            else:
                st.prefix.append(chunk)
                while len(st.prefix) * CHUNK_MS > s.prefix_padding_ms:
                    st.prefix.popleft()
            return events, audio
        audio.append(chunk)
        if probability >= max(s.threshold - HYSTERESIS, 0.01):
            st.last_voiced_ms = st.audio_ms
        elif st.audio_ms - st.last_voiced_ms >= s.silence_duration_ms:
            speech_ms = st.last_voiced_ms - st.onset_ms
            events.append(
                SpeechStopped(
                    audio_end_ms=st.audio_ms, speech_ms=speech_ms, too_short=speech_ms < s.min_speech_ms
                )
            )
            st.speaking = False
        return events, audio

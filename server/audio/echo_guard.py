"""Echo guard: while the call's own audio plays, inbound "speech" that is only our reply coming back.

For clients without echo cancellation (a car's speakers, a laptop on a table): the server knows what it
sent, so it can predict the echo. The outbound track reports each 20 ms frame's RMS and send time; each
inbound 32 ms chunk's RMS is kept with its arrival time. Over the last `WINDOW_S` the inbound envelope
is compared with the outbound one delayed by 0..`MAX_DELAY_S` (the echo path: playout buffer, speaker,
room, microphone, network back); the best-matching delay gives a gain (least squares). A chunk is echo
when the envelopes match (cosine >= `MIN_MATCH`) and its energy is within `MARGIN_DB` of the predicted
echo: its VAD probability then counts as silence, so it neither starts a turn nor barges in. A real
interruption over the echo raises the inbound energy past the margin (and breaks the envelope match),
and goes through.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

WINDOW_S = 0.5  # envelope history compared, s
MAX_DELAY_S = 0.3  # longest echo path considered (device playout + acoustic + network back)
DELAY_STEP_S = 0.02  # one outbound frame
CHUNK_S = 0.032  # one inbound VAD chunk (512 samples at 16 kHz)
MIN_MATCH = 0.8  # envelope cosine similarity that says "this is our reply"
JITTER_S = 0.04  # the echo of a word onset may arrive this much earlier or later than the best delay says
MARGIN_DB = 8.0  # inbound louder than the predicted echo by this much is the user speaking over it
SILENT_RMS = 1e-4  # outbound below this: nothing playing, nothing to guard against
QUIET_RMS = (
    1e-3  # inbound below this (-60 dBFS) while our audio plays: the VAD's memory of the echo, not speech
)


class EchoGuard:
    def __init__(self) -> None:
        self._out_t = deque(maxlen=int((WINDOW_S + MAX_DELAY_S + 0.2) / DELAY_STEP_S))  # send times, s
        self._out_rms = deque(maxlen=self._out_t.maxlen)
        n_in = int(WINDOW_S / CHUNK_S)
        self._in_t = deque(maxlen=n_in)  # arrival times, s
        self._in_rms = deque(maxlen=n_in)
        self._margin = 10 ** (MARGIN_DB / 20)
        self._last_loud_t = -1e9  # send time of the last frame that was not silence

    def sent(self, pcm: np.ndarray, t_s: float | None = None) -> None:
        """One outbound frame (any rate) as it leaves for the client."""
        t = time.monotonic() if t_s is None else t_s
        rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if pcm.size else 0.0
        self._out_t.append(t)
        self._out_rms.append(rms)
        if rms >= SILENT_RMS:
            self._last_loud_t = t

    def is_echo(self, chunk: np.ndarray, t_s: float | None = None) -> bool:
        """One inbound 16 kHz chunk, as it arrives: is it (only) our own reply coming back?"""
        t = time.monotonic() if t_s is None else t_s
        rms = float(np.sqrt(np.mean(np.square(chunk, dtype=np.float64))))
        self._in_t.append(t)
        self._in_rms.append(rms)
        if t - self._last_loud_t > MAX_DELAY_S + WINDOW_S:
            return False  # nothing of ours can be arriving now
        if rms < QUIET_RMS:
            return True
        out_t, out_rms = np.asarray(self._out_t), np.asarray(self._out_rms)
        in_t, in_rms = np.asarray(self._in_t), np.asarray(self._in_rms)  # (n,)
        best = (-1.0, 0.0, 0.0)  # (match, gain, delay s)
        for delay_s in np.arange(0.0, MAX_DELAY_S + 1e-9, DELAY_STEP_S):
            predicted = _envelope_at(out_t, out_rms, in_t - delay_s)  # (n,)
            energy = float(predicted @ predicted)
            if energy <= 0.0:
                continue
            match = float(predicted @ in_rms) / np.sqrt(energy * float(in_rms @ in_rms) + 1e-20)
            if match > best[0]:
                best = (match, float(predicted @ in_rms) / energy, float(delay_s))
        match, gain, delay_s = best
        if match < MIN_MATCH:
            return False
        around = t - delay_s + np.arange(-JITTER_S, JITTER_S + 1e-9, DELAY_STEP_S)
        out_now = float(_envelope_at(out_t, out_rms, around).max())  # the loudest echo this chunk may hold
        return rms <= self._margin * gain * out_now


def _envelope_at(out_t: np.ndarray, out_rms: np.ndarray, at_t: np.ndarray) -> np.ndarray:
    """The outbound RMS over the `CHUNK_S` before each time in `at_t` (power mean of the frames sent then)."""
    lo = np.searchsorted(out_t, at_t - CHUNK_S, side="right")
    hi = np.searchsorted(out_t, at_t, side="right")
    power = np.concatenate([[0.0], np.cumsum(out_rms**2)])
    count = np.maximum(hi - lo, 1)
    return np.sqrt((power[hi] - power[lo]) / count)

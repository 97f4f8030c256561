"""A call's inbound side: user audio -> VAD -> turns -> the responder, and the barge-in decision.

The call owns one `Listening` (as it owns a `ReplyFlow`); the transport hands it user audio through
the call (`Call.audio_arrived`, then `Call.hear` for each chunk). Each (512,) float32 16 kHz chunk goes
through the echo guard, the VAD and the turn detector; turn audio goes to the responder up to
`max_turn_audio_s`; speech over the assistant interrupts it once it has lasted `min_interrupt_ms`
(at once when the client plays the audio itself: we cannot hear what it played).
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np

from pipeline.responder import ResponderSession
from server.audio.echo_guard import EchoGuard
from server.audio.turns import SpeechStarted, SpeechStopped, TurnDetector
from server.audio.vad import SileroVad, VadState
from server.call.guard import CallGuard
from server.call.items import Items
from server.call.replies import ReplyFlow
from server.call.settings import CallSettings
from server.call.state import CallState
from server.call.transport import Transport
from server.config import Config
from server.logs import LogLimiter
from server.metrics import Metrics
from server.realtime import events
from server.realtime.events import new_id as _new_id


class Call(Protocol):
    """What the listening side reads and calls of the call that owns it (server/call/call.py)."""

    config: Config
    guard: CallGuard
    items: Items
    log: logging.LoggerAdapter
    metrics: Metrics
    replies: ReplyFlow
    session: ResponderSession
    settings: CallSettings
    state: CallState
    transport: Transport

    def send(self, message: dict) -> None: ...


class Listening:
    def __init__(self, call: Call, vad: SileroVad) -> None:
        self._call = call
        self._vad = vad
        self._vad_state = VadState()
        self.detector = TurnDetector(call.settings.turns)
        self._inbound_drops = LogLimiter()  # a sender over real time: one line (and one error) per interval
        self._user_item_id: str | None = None
        self._interrupt_armed = False  # user speech began over the assistant
        self._turn_samples = 0  # 16 kHz samples pushed to the responder for the pending user turn
        self._turn_capped = False  # the pending turn hit max_turn_audio_s
        self.echo_guard = EchoGuard()
        # The audio out reports each frame as it leaves; audio the client plays on its own clock is never
        # reported, so the guard never judges anything echo there (docs/protocol.md says why).
        call.transport.audio.on_frame = self.echo_guard.sent

    def accept_audio(self, duration_s: float) -> bool:
        """User audio of `duration_s` arrived: keep it unless it runs ahead of real time (one error and
        a rate-limited log line for each run of drops)."""
        if self._call.guard.inbound_frame(time.monotonic(), duration_s):
            return True
        self._inbound_dropped()
        return False

    def feed_chunk(self, chunk: np.ndarray) -> None:
        """One (512,) float32 16 kHz chunk of user audio -> VAD -> turns."""
        probability = self._vad.probability(self._vad_state, chunk)
        if self._call.settings.turns.echo_guard and self.echo_guard.is_echo(chunk):
            probability = 0.0  # our own reply coming back: silence as far as turns go
        detected, audio = self.detector.feed(chunk, probability)
        for item in detected:
            if isinstance(item, SpeechStarted):
                self._on_speech_started(item)
        for pcm in audio:
            self._push_turn_audio(pcm)
        self._check_barge_in()
        for item in detected:
            if isinstance(item, SpeechStopped):
                self._on_speech_stopped(item)
        if self._turn_capped and self.detector.state.speaking:
            self._cut_long_turn()

    def settings_changed(self) -> None:
        """A session.update: switching turn detection on or off drops a half-detected or uncommitted turn."""
        turns = self._call.settings.turns
        if turns.enabled != self.detector.settings.enabled:
            self.turn_audio_reset()
            self._call.session.discard_audio()
            self.detector.abandon()
        self.detector.update(turns)

    def turn_audio_reset(self) -> None:
        self._turn_samples = 0
        self._turn_capped = False

    def reset(self) -> None:
        """The call is closing: the VAD's recurrent state goes."""
        self._vad_state.reset()

    def _inbound_dropped(self) -> None:
        """Audio over real time was dropped (a sender faster than its clock: a flood, or a broken
        client)."""
        call = self._call
        call.metrics.inbound_frames_dropped.inc()
        allow, suppressed = self._inbound_drops.allow()
        if allow:
            g, flood_s = call.guard, call.config.limits.inbound_flood_s
            call.log.warning(
                "inbound audio faster than real time: %d frames (%.1f s of audio) dropped so far%s",
                g.inbound_frames_dropped,
                g.inbound_dropped_s,
                f" ({suppressed} drops since the last line)" if suppressed else "",
            )
            call.send(
                events.error_event(
                    "input_audio_too_fast",
                    "inbound audio arrives faster than real time: the "
                    "excess is dropped"
                    + (f", and the call ends if it goes on for {flood_s:g} s" if flood_s else ""),
                )
            )

    def _push_turn_audio(self, pcm: np.ndarray) -> None:
        """Audio of the pending user turn, up to `max_turn_audio_s`; the excess is dropped with one error."""
        call = self._call
        limit = int(call.config.limits.max_turn_audio_s * 16_000)
        if limit and self._turn_samples + pcm.size > limit:
            if not self._turn_capped:
                self._turn_capped = True
                call.send(
                    events.error_event(
                        "input_audio_too_long",
                        f"a user turn may hold at most "
                        f"{call.config.limits.max_turn_audio_s:g} s of audio; the rest is dropped"
                        + (" and the turn ends here" if call.settings.turns.enabled else ""),
                    )
                )
            return
        self._turn_samples += pcm.size
        call.session.push_audio(pcm)

    def _cut_long_turn(self) -> None:
        """Server VAD, speech over the limit: end the turn as if the speaker had paused."""
        st = self.detector.state
        speech_ms = st.last_voiced_ms - st.onset_ms
        self.detector.abandon()
        self._on_speech_stopped(SpeechStopped(audio_end_ms=st.audio_ms, speech_ms=speech_ms, too_short=False))

    def _on_speech_started(self, started: SpeechStarted) -> None:
        call, replies = self._call, self._call.replies
        self._user_item_id = _new_id("item")
        call.guard.user_activity(time.monotonic())
        call.state = CallState.USER_SPEAKING
        self._interrupt_armed = replies.current is not None and call.settings.turns.interrupt_response
        call.send(
            events.event(
                "input_audio_buffer.speech_started",
                audio_start_ms=int(started.audio_start_ms),
                item_id=self._user_item_id,
            )
        )
        if self._interrupt_armed and not call.transport.plays_out:
            # The client plays the audio: the server cannot hear what it played, so it cancels at speech
            # start and the client reports what it played with conversation.item.truncate (as the
            # Realtime API asks of WebSocket clients).
            self._interrupt_armed = False
            replies.interrupt("turn_detected")

    def _check_barge_in(self) -> None:
        if self._interrupt_armed and self.detector.speech_ms >= self._call.settings.turns.min_interrupt_ms:
            self._interrupt_armed = False
            self._call.replies.interrupt("turn_detected")

    def _on_speech_stopped(self, stopped: SpeechStopped) -> None:
        call = self._call
        now = time.monotonic()
        item_id = self._user_item_id or _new_id("item")
        self._interrupt_armed = False
        call.send(
            events.event(
                "input_audio_buffer.speech_stopped", audio_end_ms=int(stopped.audio_end_ms), item_id=item_id
            )
        )
        self.turn_audio_reset()
        if stopped.too_short:
            call.session.discard_audio()
            call.send(
                events.event(
                    "glm4voice.input_audio_buffer.discarded",
                    item_id=item_id,
                    reason="shorter than min_speech_ms",
                    speech_ms=round(stopped.speech_ms),
                )
            )
            call.state = CallState.SPEAKING if call.replies.current is not None else CallState.LISTENING
            return
        call.session.commit_audio()
        call.items.user_item_committed(item_id, None)
        if call.settings.turns.create_response:
            call.replies.start(speech_stopped_s=now)
        else:
            call.state = CallState.LISTENING

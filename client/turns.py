"""The call's turn state as the client sees it, kept from server events: who is talking, the reply in
progress and its latency timeline. The call reads it to gate the microphone (half-duplex, push-to-talk)
and to know when a scripted call (WAV file, typed turns) is over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODES = ("hands_free", "push_to_talk", "half_duplex")
LOUD_RMS = 1e-3  # a received frame above this is reply audio (Opus silence decodes to ~0)


def session_for(mode: str, instructions: str | None) -> dict:
    """The call's starting session: push-to-talk turns server VAD off (turns end on commit); half-duplex
    keeps VAD but never lets speech cut a reply (the microphone is closed while it plays anyway)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    td = (
        None if mode == "push_to_talk" else {"type": "server_vad", "interrupt_response": mode == "hands_free"}
    )
    # the user's words on spoken turns; a server that cannot transcribe lists the field as ignored
    session: dict = {"audio": {"input": {"turn_detection": td, "transcription": {"model": "whisper"}}}}
    if instructions:
        session["instructions"] = instructions
    return session


@dataclass
class Reply:
    response_id: str
    origin_s: float | None  # client clock when the user's turn ended (speech_stopped, commit, typed text)
    transcript: str = ""
    status: str = ""  # response.done's status
    audio_started: bool = False
    playback_ended: bool = False
    cut_off_reason: str = ""
    played_ms: float | None = None  # the server's count of what was sent before a cut-off
    server_latency: dict = field(default_factory=dict)  # glm4voice.turn.latency
    first_loud_s: float | None = None
    last_loud_s: float | None = None

    def summary(self) -> dict:
        """The turn as one `client.turn` event: text, how it ended, how long its audio was, its timeline."""
        heard_ms = None
        if self.first_loud_s is not None and self.last_loud_s is not None:
            heard_ms = round((self.last_loud_s - self.first_loud_s) * 1000 + 20)  # + the last 20 ms frame
        first_audio_ms = None
        if self.first_loud_s is not None and self.origin_s is not None:
            first_audio_ms = round((self.first_loud_s - self.origin_s) * 1000)
        return {
            "type": "client.turn",
            "response_id": self.response_id,
            "status": self.status,
            "transcript": self.transcript,
            "cut_off": self.cut_off_reason or None,
            "played_ms": self.played_ms,
            "heard_audio_ms": heard_ms,
            "origin": self.server_latency.get("origin"),
            "stages_ms": self.server_latency.get("stages_ms", {}),
            "first_audio_heard_ms": first_audio_ms,
        }


@dataclass
class TurnState:
    user_speaking: bool = False
    turn_ended_s: float | None = None  # a user turn ended and its reply has not started yet
    user_turns: int = 0
    reply: Reply | None = None
    ending: Reply | None = None  # the last reply, in its tail after playback

    def reset(self) -> None:
        """A new connection: whatever was in progress on the old one is gone."""
        self.user_speaking = False
        self.turn_ended_s = None
        self.reply = None
        self.ending = None

    @property
    def assistant_active(self) -> bool:
        """A reply is being generated or played (the tail after it is the call's business)."""
        return self.reply is not None and not self.reply.playback_ended

    @property
    def idle(self) -> bool:
        """Nobody is talking and no reply is pending, playing or in its tail."""
        return (
            not self.user_speaking
            and self.turn_ended_s is None
            and self.reply is None
            and self.ending is None
        )

    def user_turn_ended(self, now_s: float) -> None:
        self.turn_ended_s = now_s
        self.user_turns += 1

    def on_event(self, event: dict, now_s: float) -> Reply | None:
        """Update from one server event; returns the reply whose playback just ended, if any."""
        kind = event.get("type", "")
        if kind == "input_audio_buffer.speech_started":
            self.user_speaking = True
        elif kind == "input_audio_buffer.speech_stopped":
            self.user_speaking = False
            self.user_turn_ended(now_s)
        elif kind == "glm4voice.input_audio_buffer.discarded":
            self.user_speaking = False
            self.turn_ended_s = None
            self.user_turns -= 1
        elif kind == "response.created":
            self.reply = Reply(event["response"]["id"], self.turn_ended_s)
            self.turn_ended_s = None
        else:
            return self._on_reply_event(kind, event)
        return None

    def _on_reply_event(self, kind: str, event: dict) -> Reply | None:
        rid = event.get("response", {}).get("id") if kind == "response.done" else event.get("response_id")
        reply = next((r for r in (self.reply, self.ending) if r is not None and r.response_id == rid), None)
        if reply is None:
            return None
        if kind == "response.output_audio_transcript.delta":
            reply.transcript += event.get("delta", "")
        elif kind == "output_audio_buffer.started":
            reply.audio_started = True
        elif kind == "glm4voice.turn.latency":
            reply.server_latency = event
        elif kind == "glm4voice.response.cancelled":
            reply.cut_off_reason = event.get("reason", "cancelled")
            reply.played_ms = event.get("played_ms")
        elif kind == "response.done":
            reply.status = event["response"].get("status", "")
            # A reply that never started playing and will not (failed, cut before its first frame) ends here.
            no_audio = reply.status != "completed" or (
                reply.server_latency and "first_frame_sent" not in reply.server_latency.get("stages_ms", {})
            )
            if reply is self.reply and not reply.audio_started and no_audio:
                return self._end()
        elif kind in ("output_audio_buffer.stopped", "output_audio_buffer.cleared") and reply is self.reply:
            return self._end()
        return None

    def _end(self) -> Reply | None:
        """The current reply's playback ended; it stays `ending` (late frames, a late response.done) until
        the call takes its summary."""
        reply, self.reply = self.reply, None
        if reply is not None:
            reply.playback_ended = True
            self.ending = reply
        return reply

    def on_audio(self, pcm: np.ndarray, now_s: float, reply: Reply | None) -> None:
        """Mark loud frames of the reply being heard (the current one, or one still in its tail)."""
        if reply is not None and float(np.sqrt(np.mean(pcm**2))) > LOUD_RMS:
            if reply.first_loud_s is None:
                reply.first_loud_s = now_s
            reply.last_loud_s = now_s

"""The assistant's side of a call: start a reply, move its events to the data channel and the outbound
track, cut it off (barge-in), report playback and latency. A mixin of `server.call.Call`, which owns
the state it uses (`_session`, `track`, `_reply`, `state`, `metrics`, `send`, `_spawn`, `log`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.responder import AudioChunk, TextDelta, Timing, Turn, TurnDone, TurnError
from server import protocol as P
from server.protocol import new_id as _new_id


@dataclass
class ReplyState:
    """The assistant reply in progress (generation and/or playback)."""

    response_id: str
    turn: Turn
    speech_stopped_s: float | None  # VAD end decision that triggered it (None: response.create)
    timings: dict[str, float]
    generating: bool = True
    latency_sent: bool = False


class ReplyFlow:
    # ----- replies ---------------------------------------------------------------------------------

    def start_response(self, speech_stopped_s: float | None) -> None:
        if self._reply is not None:
            self.interrupt("new_turn")
        try:
            turn = self._session.respond()
        except Exception as exc:  # a responder refusing a turn must not end the call
            self.log.exception("respond() failed")
            self.metrics.turn_errors += 1
            self.send(P.error_event("responder_error", f"could not start a reply: {exc}", error_type="server_error"))
            return
        response_id = _new_id("resp")
        timings = {"speech_stopped": speech_stopped_s} if speech_stopped_s is not None else {}
        reply = ReplyState(response_id, turn, speech_stopped_s, timings)
        self._reply = reply
        self.track.begin_reply(response_id)
        self.metrics.turns_total += 1
        self.state = "thinking"
        self.send(P.event("response.created", response=P.response_object(response_id, "in_progress")))
        self._spawn(self._run_turn(reply), f"turn:{response_id}")

    async def _run_turn(self, reply: ReplyState) -> None:
        transcript: list[str] = []
        item_id = _new_id("item")
        status, details = "completed", None
        try:
            status, details = await self._pump_turn(reply, item_id, transcript)
        except Exception as exc:  # a broken responder fails this turn only
            self.log.exception("turn %s failed", reply.response_id)
            self.metrics.turn_errors += 1
            status, details = "failed", {"type": "failed", "error": {"code": "responder_error", "message": str(exc)}}
            self.send(P.error_event("responder_error", f"the reply failed: {exc}", error_type="server_error"))
        reply.generating = False
        text = "".join(transcript)
        if self._reply is reply:
            self.track.end_reply()
            if status == "failed":
                self.track.clear()
        if status == "cancelled" and details is None:
            details = {"type": "cancelled", "reason": "turn_detected"}
        self.send(P.event("response.output_audio_transcript.done", response_id=reply.response_id, item_id=item_id,
                          output_index=0, content_index=0, transcript=text))
        self.send(P.event("response.done", response=P.response_object(reply.response_id, status, details, text)))
        audio_pending = self._reply is reply and self.track.active
        if not reply.latency_sent and not audio_pending:  # with audio, it goes out with the first frame
            self._send_latency(reply)
        if self._reply is reply and not self.track.active:
            self._reply = None
            self.state = "listening" if self.state != "user_speaking" else self.state

    async def _pump_turn(self, reply: ReplyState, item_id: str, transcript: list[str]) -> tuple[str, dict | None]:
        """Move one reply's events to the data channel and the outbound track until it ends."""
        status, details = "completed", None
        async for item in reply.turn.events():
            if isinstance(item, TextDelta):
                transcript.append(item.text)
                self.send(P.event("response.output_audio_transcript.delta", response_id=reply.response_id,
                                  item_id=item_id, output_index=0, content_index=0, delta=item.text))
            elif isinstance(item, AudioChunk):
                if self._reply is reply:
                    self.track.push(item.pcm, item.sample_rate_hz)
            elif isinstance(item, Timing):
                reply.timings.setdefault(item.stage, item.t_monotonic_s)
            elif isinstance(item, TurnDone):
                status = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}.get(item.reason,
                                                                                                     "completed")
                if item.reason == "length":
                    details = {"type": "incomplete", "reason": "max_output_tokens"}
                if item.text:
                    transcript[:] = [item.text]
                break
            elif isinstance(item, TurnError):
                self.metrics.turn_errors += 1
                status, details = "failed", {"type": "failed", "error": {"code": item.code, "message": item.message}}
                self.send(P.error_event(item.code, item.message, error_type="server_error"))
                break
        return status, details

    def interrupt(self, reason: str) -> None:
        """Barge-in, response.cancel, output_audio_buffer.clear or a typed message: stop the reply now."""
        reply = self._reply
        if reply is None:
            return
        played_ms = self.track.clear()  # the next outbound frame is silence
        self._reply = None
        reply.turn.cancel(played_ms=played_ms)
        self.metrics.turns_interrupted += 1
        self.send(P.event("output_audio_buffer.cleared", response_id=reply.response_id))
        self.send(P.event("glm4voice.response.cancelled", response_id=reply.response_id, reason=reason,
                          played_ms=round(played_ms), still_generating=reply.generating))
        self.log.info("reply %s interrupted (%s) after %.0f ms played", reply.response_id, reason, played_ms)

    def _on_playback_started(self, response_id: str, t_s: float) -> None:
        reply = self._reply
        if reply is None or reply.response_id != response_id:
            return
        reply.timings.setdefault("first_frame_sent", t_s)
        if self.state != "user_speaking":
            self.state = "speaking"
        self.send(P.event("output_audio_buffer.started", response_id=response_id))
        self._send_latency(reply)

    def _on_playback_stopped(self, response_id: str) -> None:
        self.send(P.event("output_audio_buffer.stopped", response_id=response_id))
        reply = self._reply
        if reply is not None and reply.response_id == response_id and not reply.generating:
            self._reply = None
            if self.state != "user_speaking":
                self.state = "listening"

    def _send_latency(self, reply: ReplyState) -> None:
        reply.latency_sent = True
        origin = reply.speech_stopped_s if reply.speech_stopped_s is not None else min(reply.timings.values(),
                                                                                       default=None)
        if origin is None:
            return
        stages_ms = {stage: round((t - origin) * 1000.0, 1) for stage, t in sorted(reply.timings.items(),
                                                                                  key=lambda kv: kv[1])}
        first = reply.timings.get("first_frame_sent")
        if reply.speech_stopped_s is not None and first is not None:
            self.metrics.turn_latency.observe(first - reply.speech_stopped_s)
        self.send(P.event("glm4voice.turn.latency", response_id=reply.response_id,
                          origin="speech_stopped" if reply.speech_stopped_s is not None else "first_stage",
                          stages_ms=stages_ms,
                          speech_stopped_to_first_frame_ms=stages_ms.get("first_frame_sent")
                          if reply.speech_stopped_s is not None else None))

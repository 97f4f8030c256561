"""The assistant's side of a call: start a reply, move its events and audio to the transport, cut it
off (barge-in), report playback and latency, and end a reply whose audio nobody reads.

An object the call owns (`Call.replies`): it drives the transport's audio out (server/call/transport.py)
and holds the reply in progress, and talks back to the call only through what it is given - `send` (a
server event), `spawn` (a task of the call), `on_phase` (the call's state: thinking / speaking /
listening).

One word per state of a reply: it is *current* from its start until its audio has played out or it
is cut off (`current`; `idle` is set while there is none); it is *generating* while the responder still
produces its events (`generating` for the current one; `generating_items` counts cut ones too, whose
`response.done` is still to come); an item is *in progress* (the Realtime status) while either holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

from pipeline.responder import (
    AudioChunk,
    Reply,
    ReplyDone,
    ReplyError,
    ReplyOptions,
    ResponderSession,
    TextDelta,
    Timing,
)
from server.call.state import CallState
from server.call.transport import AudioOut
from server.metrics import Metrics
from server.realtime import events
from server.realtime.conversation import Conversation
from server.realtime.events import new_id as _new_id

# A reply whose audio is all generated ends at the latest this long after its queued audio would have
# played out: a peer that never reads our track (a sendonly offer, a stalled sender) must not hold the
# call "replying" - which keeps idle_timeout from ever firing - until max_call_duration.
PLAYOUT_SLACK_S = 2.0
CLIENT_CAUSED = {"input_too_large"}  # reply errors that are the client's doing (the rest: the server's)
# Why a reply was cut off -> Realtime's `status_details.reason` (a typed message is the client's doing,
# a new spoken turn the user's).
CANCEL_REASONS = {
    "client_cancelled": "client_cancelled",
    "user_message": "client_cancelled",
    "turn_detected": "turn_detected",
    "new_turn": "turn_detected",
}


@dataclass
class ReplyRecord:
    """One reply as the server tracks it, from `response.created` to its `response.done` and playout."""

    response_id: str
    reply: Reply
    speech_stopped_s: float | None  # VAD end decision that triggered it (None: response.create)
    timings: dict[str, float]
    item_id: str
    generating: bool = True
    latency_sent: bool = False
    cancel_reason: str | None = None  # set when the reply is cut off (interrupt)
    played_ms: float | None = None  # what was heard at the cut
    metadata: dict | None = None  # the client's, from response.create: on response.created and .done
    event_id: str | None = None  # the response.create that asked for it: named by the reply's errors


class ReplyFlow:
    def __init__(
        self,
        session: ResponderSession,
        metrics: Metrics,
        send: Callable[[dict], None],
        spawn: Callable[[Coroutine, str], asyncio.Task],
        on_phase: Callable[[CallState], None],
        log: logging.LoggerAdapter,
        conversation: Conversation,
        audio: AudioOut,
        plays_out: bool,
    ) -> None:
        """`audio`: where reply audio goes; `plays_out`: it plays on the server's clock, so the
        `output_audio_buffer.*` events are ours to send (server/call/transport.py)."""
        self._session = session
        self._metrics = metrics
        self._send = send
        self._spawn = spawn
        self._on_phase = on_phase
        self._log = log
        self.conversation = conversation
        audio.on_started, audio.on_stopped = self._on_playback_started, self._on_playback_stopped
        self.audio = audio
        self.plays_out = plays_out
        self.generating_items: set[str] = set()  # items whose reply is generating (cut ones too)
        self.current: ReplyRecord | None = None
        self.idle = asyncio.Event()  # set while no reply is in progress (drain waits on it)
        self.idle.set()
        self._playout_timer: asyncio.TimerHandle | None = None

    @property
    def generating(self) -> bool:
        return self.current is not None and self.current.generating

    def _set_current(self, reply: ReplyRecord | None) -> None:
        if self._playout_timer is not None:
            self._playout_timer.cancel()
            self._playout_timer = None
        self.current = reply
        if reply is None:
            self.idle.set()
        else:
            self.idle.clear()

    # ----- replies ---------------------------------------------------------------------------------

    def start(
        self,
        speech_stopped_s: float | None,
        options: ReplyOptions | None = None,
        metadata: dict | None = None,
        event_id: str | None = None,
    ) -> None:
        """A reply to what is pending, or to the conversation as it stands; `options`, `metadata` and
        `event_id` come from the response.create that asked for it (None: VAD started it)."""
        if self.current is not None:
            self.interrupt("new_turn")
        try:
            started = self._session.respond(options) if options is not None else self._session.respond()
        except Exception as exc:  # a responder refusing a reply must not end the call
            self._log.exception("respond() failed")
            self._metrics.reply_errors.inc()
            self._send(
                events.error_event(
                    "responder_error",
                    f"could not start a reply: {exc}",
                    event_id=event_id,
                    error_type="server_error",
                )
            )
            return
        response_id = _new_id("resp")
        timings = {"speech_stopped": speech_stopped_s} if speech_stopped_s is not None else {}
        reply = ReplyRecord(
            response_id,
            started,
            speech_stopped_s,
            timings,
            _new_id("item"),
            metadata=metadata,
            event_id=event_id,
        )
        self._set_current(reply)
        self.generating_items.add(reply.item_id)
        self.audio.begin_reply(response_id)
        self._metrics.replies.inc()
        self._on_phase(CallState.THINKING)
        ids = {"response_id": response_id, "item_id": reply.item_id, "output_index": 0, "content_index": 0}
        item = events.assistant_item(reply.item_id, "in_progress", None)
        created = events.response_object(response_id, "in_progress", metadata=metadata)
        self._send(events.event("response.created", response=created))
        self._send(
            events.event("response.output_item.added", response_id=response_id, output_index=0, item=item)
        )
        previous = self.conversation.add(item, started)
        self._send(events.event("conversation.item.added", previous_item_id=previous, item=item))
        self._send(
            events.event("response.content_part.added", **ids, part={"type": "audio", "transcript": ""})
        )
        self._spawn(self._run_reply(reply), f"reply:{response_id}")

    async def _run_reply(self, reply: ReplyRecord) -> None:
        transcript: list[str] = []
        status, details = "completed", None
        try:
            status, details = await self._pump_reply(reply, transcript)
        except Exception as exc:  # a broken responder fails this reply only
            self._log.exception("reply %s failed", reply.response_id)
            self._metrics.reply_errors.inc()
            status, details = (
                "failed",
                {"type": "failed", "error": {"code": "responder_error", "message": str(exc)}},
            )
            self._send(
                events.error_event(
                    "responder_error",
                    f"the reply failed: {exc}",
                    event_id=reply.event_id,
                    error_type="server_error",
                )
            )
        reply.generating = False
        self.generating_items.discard(reply.item_id)
        text = "".join(transcript)
        if self.current is reply:
            self.audio.end_reply()
            if status == "failed":
                self.audio.clear()
        if reply.cancel_reason is not None and status != "failed":
            # Cut off, even when the responder finished before it saw the cancel: the client gets what
            # was heard, never the text of audio it did not hear.
            if status != "cancelled":
                heard = reply.reply.heard_transcript(reply.played_ms or 0.0)
                text = text if heard is None else heard
            status = "cancelled"
            details = {
                "type": "cancelled",
                "reason": CANCEL_REASONS.get(reply.cancel_reason, "turn_detected"),
            }
        self._finish_item(reply, status, details, text)
        audio_pending = self.current is reply and self.audio.active
        if not reply.latency_sent and not audio_pending:  # with audio, it goes out with the first frame
            self._send_latency(reply)
        if self.current is reply and not self.audio.active:
            self._set_current(None)
            self._on_phase(CallState.LISTENING)
        elif audio_pending:
            deadline_s = self.audio.queued_ms / 1000.0 + PLAYOUT_SLACK_S
            self._playout_timer = asyncio.get_running_loop().call_later(
                deadline_s, self._playout_timed_out, reply
            )

    def _finish_item(self, reply: ReplyRecord, status: str, details: dict | None, text: str) -> None:
        """The GA closing sequence of a reply's item, then `response.done` with the item in `output`."""
        ids = {
            "response_id": reply.response_id,
            "item_id": reply.item_id,
            "output_index": 0,
            "content_index": 0,
        }
        item = events.assistant_item(
            reply.item_id, "completed" if status == "completed" else "incomplete", text
        )
        self._send(events.event("response.output_audio.done", **ids))
        self._send(events.event("response.output_audio_transcript.done", **ids, transcript=text))
        self._send(
            events.event("response.content_part.done", **ids, part={"type": "audio", "transcript": text})
        )
        self._send(
            events.event(
                "response.output_item.done", response_id=reply.response_id, output_index=0, item=item
            )
        )
        self.conversation.replace(item)
        self._send(events.event("conversation.item.done", item=item))
        self._send(
            events.event(
                "response.done",
                response=events.response_object(reply.response_id, status, details, [item], reply.metadata),
            )
        )

    def truncate(self, item_id: str, reply: Reply, audio_end_ms: int) -> str | None:
        """The client heard only `audio_end_ms` of an assistant item: cut its reply in the history there
        (the barge-in rule) and the item's transcript with it. Returns the kept transcript (None: unknown,
        or reported with the reply's `response.done`, which is still to come)."""
        if self.current is not None and self.current.reply is reply:
            self.interrupt("client_cancelled", played_ms=audio_end_ms)
        else:
            reply.cancel(played_ms=audio_end_ms)
        if item_id in self.generating_items:
            return None
        heard = reply.heard_transcript(audio_end_ms)
        if heard is not None and self.conversation.get(item_id) is not None:
            self.conversation.replace(events.assistant_item(item_id, "incomplete", heard))
        return heard

    async def _pump_reply(self, reply: ReplyRecord, transcript: list[str]) -> tuple[str, dict | None]:
        """Move one reply's events to the client and its audio out until it ends."""
        status, details = "completed", None
        async for item in reply.reply.events():
            if isinstance(item, TextDelta):
                transcript.append(item.text)
                self._send(
                    events.event(
                        "response.output_audio_transcript.delta",
                        response_id=reply.response_id,
                        item_id=reply.item_id,
                        output_index=0,
                        content_index=0,
                        delta=item.text,
                    )
                )
            elif isinstance(item, AudioChunk):
                if self.current is reply:
                    self.audio.push(item.pcm, item.sample_rate_hz)
            elif isinstance(item, Timing):
                reply.timings.setdefault(item.stage, item.t_monotonic_s)
            elif isinstance(item, ReplyDone):
                status = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}.get(
                    item.reason, "completed"
                )
                if item.reason == "length":
                    details = {"type": "incomplete", "reason": "max_output_tokens"}
                if item.text or item.reason == "cancelled":  # a cut reply: what the history kept
                    transcript[:] = [item.text]
                break
            elif isinstance(item, ReplyError):
                self._metrics.reply_errors.inc()
                status, details = (
                    "failed",
                    {"type": "failed", "error": {"code": item.code, "message": item.message}},
                )
                error_type = "invalid_request_error" if item.code in CLIENT_CAUSED else "server_error"
                self._send(
                    events.error_event(
                        item.code, item.message, event_id=reply.event_id, error_type=error_type
                    )
                )
                break
        return status, details

    def interrupt(self, reason: str, played_ms: float | None = None) -> None:
        """Barge-in, response.cancel, output_audio_buffer.clear or a typed message: stop the reply now.
        `played_ms`: what the client says it heard (truncate); else what went out."""
        reply = self.current
        if reply is None:
            return
        sent_ms = self.audio.clear()  # the next outbound frame is silence
        played_ms = sent_ms if played_ms is None else min(played_ms, sent_ms)
        self._set_current(None)
        reply.cancel_reason, reply.played_ms = reason, played_ms
        reply.reply.cancel(played_ms=played_ms)
        self._metrics.replies_interrupted.inc()
        if self.plays_out:
            self._send(events.event("output_audio_buffer.cleared", response_id=reply.response_id))
        self._send(
            events.event(
                "glm4voice.response.cancelled",
                response_id=reply.response_id,
                reason=reason,
                played_ms=round(played_ms),
                still_generating=reply.generating,
            )
        )
        self._log.info("reply %s interrupted (%s) after %.0f ms played", reply.response_id, reason, played_ms)

    def close(self) -> None:
        """The call is closing: cancel the reply in progress, keep what was heard."""
        reply = self.current
        if reply is not None:
            played_ms = self.audio.clear()
            self._set_current(None)
            reply.reply.cancel(played_ms=played_ms)

    def _playout_timed_out(self, reply: ReplyRecord) -> None:
        """Nobody read the reply's audio in time: end the reply as if it had played."""
        self._playout_timer = None
        if self.current is not reply:
            return
        unplayed_ms = self.audio.queued_ms
        played_ms = self.audio.clear()
        self._set_current(None)
        self._log.warning(
            "reply %s: the peer is not reading our audio (%.0f ms unplayed): reply ended",
            reply.response_id,
            unplayed_ms,
        )
        self._send(
            events.event(
                "glm4voice.output_audio_buffer.timed_out",
                response_id=reply.response_id,
                played_ms=round(played_ms),
                unplayed_ms=round(unplayed_ms),
            )
        )
        self._on_phase(CallState.LISTENING)

    # ----- playback (the audio out's callbacks) ----------------------------------------------------

    def _on_playback_started(self, response_id: str, t_s: float) -> None:
        reply = self.current
        if reply is None or reply.response_id != response_id:
            return
        reply.timings.setdefault("first_frame_sent", t_s)
        self._on_phase(CallState.SPEAKING)
        if self.plays_out:
            self._send(events.event("output_audio_buffer.started", response_id=response_id))
        self._send_latency(reply)

    def _on_playback_stopped(self, response_id: str) -> None:
        if self.plays_out:
            self._send(events.event("output_audio_buffer.stopped", response_id=response_id))
        reply = self.current
        if reply is not None and reply.response_id == response_id and not reply.generating:
            self._set_current(None)
            self._on_phase(CallState.LISTENING)

    def _send_latency(self, reply: ReplyRecord) -> None:
        reply.latency_sent = True
        origin = (
            reply.speech_stopped_s
            if reply.speech_stopped_s is not None
            else min(reply.timings.values(), default=None)
        )
        if origin is None:
            return
        stages_ms = {
            stage: round((t - origin) * 1000.0, 1)
            for stage, t in sorted(reply.timings.items(), key=lambda kv: kv[1])
        }
        first = reply.timings.get("first_frame_sent")
        if reply.speech_stopped_s is not None and first is not None:
            self._metrics.reply_latency.observe(first - reply.speech_stopped_s)
        self._send(
            events.event(
                "glm4voice.turn.latency",
                response_id=reply.response_id,
                origin="speech_stopped" if reply.speech_stopped_s is not None else "first_stage",
                stages_ms=stages_ms,
                speech_stopped_to_first_frame_ms=stages_ms.get("first_frame_sent")
                if reply.speech_stopped_s is not None
                else None,
            )
        )

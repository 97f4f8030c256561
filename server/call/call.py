"""One call: inbound audio -> VAD -> turns -> responder -> outbound track, plus its data channel.

Read it as a pipeline (moshi's server style): the call's `Listening` turns inbound frames into VAD
decisions and user audio for the responder; its `ReplyFlow` moves each reply's events to the data
channel and the outbound track. The call itself holds the settings, the client events and the limits.
Every way a call can end goes through `close()`, which frees everything whatever fails inside it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack

from pipeline.responder import (
    Reply,
    Responder,
    ResponderSession,
)
from server.audio.vad import SileroVad
from server.call.guard import CallGuard
from server.call.listening import Listening
from server.call.replies import ReplyFlow
from server.call.resume import ParkedCall, ParkedCalls, new_resume_token
from server.call.settings import CallSettings
from server.call.state import CallState
from server.config import Config
from server.logs import LogLimiter, call_tag, current_call_id, run_as_call
from server.metrics import Metrics
from server.realtime import protocol as P
from server.realtime.conversation import Conversation
from server.realtime.protocol import new_id as _new_id
from server.webrtc.media import OutboundAudioTrack

log = logging.getLogger("glm4voice.call")
MAX_EVENTS_BEFORE_OPEN = 64  # events queued until the client's data channel opens
WATCH_INTERVAL_S = 0.5  # how often the watchdog checks duration, idle time and peer liveness
CLOSING_FLUSH_S = 0.5  # at most this long to get the closing event out before the connection goes
RESUME_FAILED = {  # glm4voice.session.resume_failed reasons: this call starts a fresh conversation
    "expired": "the resume window of the dropped call ended; its conversation is gone",
    "already_resumed": "that resume token was used already (each is good for one reconnect)",
    "unknown": "no dropped call holds that resume token",
    "disabled": "this server keeps no dropped calls (limits.resume_window_s = 0)",
}
PC_CLOSE_TIMEOUT_S = 5.0  # aiortc's close awaits its transports; a stuck one must not hold the call slot


class CallLog(logging.LoggerAdapter):
    """Sets `extra["call_id"]`; server/logs.py prints its tag (a short hash) on every line (text or JSON)."""

    def process(self, msg, kwargs):
        kwargs.setdefault("extra", {}).update(self.extra)
        return msg, kwargs


def new_call_id() -> str:
    """Unguessable: the hangup URL holds it, and it is the only key to someone else's call."""
    return f"rtc_{secrets.token_hex(12)}"


class Call:
    def __init__(
        self,
        call_id: str,
        pc: RTCPeerConnection | None,
        responder: Responder,
        vad: SileroVad,
        config: Config,
        metrics: Metrics,
        settings: CallSettings,
        on_closed: Callable[[Call], None],
        track: OutboundAudioTrack | None = None,
        parking: ParkedCalls | None = None,
        resumed: ParkedCall | str | None = None,
    ) -> None:
        """`pc` None and `track` a delta sender: a WebSocket call (server/websocket/socket.py). `parking`: where a
        dropped call leaves its conversation (server/call/resume.py); `resumed`: the conversation this call
        continues, or why the one asked for could not be resumed."""
        self.call_id = call_id
        self.pc = pc
        self.config = config
        self.metrics = metrics
        self.settings = settings
        self.created_s = time.monotonic()
        self.state = CallState.CONNECTING
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._on_closed = on_closed
        self._responder_name = responder.info().name
        self._parking = parking
        self.resume_token = new_resume_token() if parking is not None else None
        self._resumed = resumed
        if isinstance(resumed, ParkedCall):
            self.session: ResponderSession = resumed.session
            self.session.update(settings.responder_settings())
        else:
            self.session = responder.open_session(call_id, settings.responder_settings())
        self._channel: RTCDataChannel | None = None
        self._sink: Callable[[str], None] | None = None  # the WebSocket's send, instead of a data channel
        self.audio_in: Callable[[bytes], None] | None = None  # the WebSocket's input_audio_buffer.append
        self.observers: list[Callable[[str], None]] = []  # control connections: a copy of every event
        self.conversation = resumed.conversation if isinstance(resumed, ParkedCall) else Conversation()
        self._outbox: list[str] = []
        self._tasks: set[asyncio.Task] = set()
        self._inbound_attached = False
        self._ending = False  # end() is telling the client; a second reason is not sent
        self.log = CallLog(log, {"call_id": call_id})
        self.replies = ReplyFlow(
            self.session,
            metrics,
            self.send,
            self._spawn,
            self._reply_phase,
            self.log,
            self.conversation,
            track,
        )
        self.guard = CallGuard(config.limits, self.created_s)
        self._event_failures = LogLimiter()  # a client repeating an event that fails: one line per interval
        self.listening = Listening(self, vad)
        self._spawn(self._watch(), "watchdog")

    # ----- wiring (called by server/app.py) ---------------------------------------------------------

    @property
    def track(self) -> OutboundAudioTrack:
        """The call's one outbound audio track (signalling adds it to the peer connection)."""
        return self.replies.track

    def attach_inbound(self, track: MediaStreamTrack) -> None:
        if self._inbound_attached:  # one microphone per call; another audio section is ignored
            return
        self._inbound_attached = True
        self._spawn(self.listening.run(track), "recv")

    def attach_channel(self, channel: RTCDataChannel) -> None:
        if channel.label != "oai-events":
            self.log.info("ignoring data channel %r", channel.label)
            return
        self._channel = channel
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._on_channel_open()
        else:
            channel.on("open", self._on_channel_open)

    def attach_sink(self, sink: Callable[[str], None]) -> None:
        """A WebSocket call: events go to `sink` (text frames); the session starts now."""
        self._sink = sink
        self._on_channel_open()

    @property
    def replying(self) -> bool:
        return self.replies.active

    def connected(self) -> None:
        if self.state is CallState.CONNECTING:
            self.state = CallState.LISTENING

    def _reply_phase(self, phase: CallState) -> None:
        """The reply flow's view of the call: a reply started (thinking), plays (speaking) or ended
        (listening). User speech over the assistant keeps USER_SPEAKING; nothing reopens a closed call."""
        if self.state is CallState.CLOSED:
            return
        if phase is CallState.THINKING or self.state is not CallState.USER_SPEAKING:
            self.state = phase

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(
            coro, name=f"call {call_tag(self.call_id)}:{name}", context=run_as_call(self.call_id)
        )
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task %s failed", task.get_name(), exc_info=task.exception())
            self.send(
                P.error_event(
                    "server_error", f"internal error in {task.get_name()}", error_type="server_error"
                )
            )

    # ----- outbound events -------------------------------------------------------------------------

    def send(self, message: dict) -> None:
        text = P.dumps(message)
        for observer in self.observers:
            observer(text)
        if self._sink is not None:
            self._sink(text)
            return
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(text)
        elif len(self._outbox) < MAX_EVENTS_BEFORE_OPEN:
            self._outbox.append(text)

    def _on_channel_open(self) -> None:
        resume = (
            {"resume_token": self.resume_token, "resume_window_s": self._parking.window_s}
            if self._parking is not None
            else {}
        )
        self.send(P.event("session.created", session=self._session_json(), **resume))
        if isinstance(self._resumed, ParkedCall):
            self.send(P.event("glm4voice.session.resumed", items=len(self.conversation)))
        elif self._resumed is not None:
            self.send(
                P.event(
                    "glm4voice.session.resume_failed",
                    reason=self._resumed,
                    message=RESUME_FAILED[self._resumed],
                )
            )
        self._resumed = None  # the parked call's objects now belong to this call
        outbox, self._outbox = self._outbox, []
        for text in outbox:
            if self._sink is not None:
                self._sink(text)
            else:
                assert self._channel is not None
                self._channel.send(text)

    def _session_json(self) -> dict:
        s = self.settings
        return P.session_object(
            self.call_id,
            s.instructions,
            s.turn_detection_json(),
            s.sampling,
            self._responder_name,
            s.input_format,
            s.output_format,
            s.ignored,
        )

    # ----- client events ---------------------------------------------------------------------------

    def _on_message(self, message: str | bytes) -> None:
        """aiortc's receive loop calls this (through pyee): whatever goes wrong, nothing may escape into it,
        or the loop - and with it the call - ends. A failure is one `error` event and a rate-limited log line."""
        token = current_call_id.set(self.call_id)
        try:
            self._on_message_in_call(message)
        except Exception:
            self.metrics.events_failed += 1
            allow, suppressed = self._event_failures.allow()
            if allow:
                self.log.exception(
                    "client event failed%s", f" ({suppressed} more since the last line)" if suppressed else ""
                )
            try:
                self.send(
                    P.error_event(
                        "server_error",
                        "the event could not be handled; the call goes on",
                        error_type="server_error",
                    )
                )
            except Exception:  # the channel itself is failing; the close path will notice
                pass
        finally:
            current_call_id.reset(token)

    def _on_message_in_call(self, message: str | bytes) -> None:
        limits = self.config.limits
        accept, complain = self.guard.event_arrived(time.monotonic())
        if not accept:
            self.metrics.events_dropped += 1
            if complain:
                self.send(
                    P.error_event(
                        "rate_limited",
                        f"more than {limits.max_events_per_s:g} events per second: "
                        f"events are being dropped ({self.guard.events_dropped} so far)",
                    )
                )
            return
        try:
            event = P.parse_client_event(
                message,
                max_event_bytes=limits.max_event_bytes,
                max_text_chars=limits.max_text_chars,
                max_instructions_chars=limits.max_instructions_chars,
            )
            if self._makes_engine_work(event) and not self.guard.expensive_event(time.monotonic()):
                raise P.ProtocolError(
                    "rate_limited",
                    f"response.create and instructions changes are limited to "
                    f"{limits.max_expensive_events_per_s:g} per second: this one was dropped",
                    event.event_id,
                )
            self.handle_event(event)
        except P.ProtocolError as exc:
            self.send(P.error_event(exc.code, exc.message, event_id=exc.event_id, param=exc.param))

    def _makes_engine_work(self, event: P.ClientEvent) -> bool:
        """Events that make the engine prefill (a reply; new instructions re-prefill the system prompt):
        charged against their own, lower rate, so one caller cannot keep the shared engine busy."""
        if isinstance(event, P.ResponseCreate):
            return True
        return isinstance(event, P.SessionUpdate) and event.instructions not in (
            None,
            self.settings.instructions,
        )

    def handle_event(self, event: P.ClientEvent) -> None:
        if isinstance(event, P.SessionUpdate):
            self.settings = self.settings.apply(event)
            self.listening.settings_changed()
            self.session.update(self.settings.responder_settings())
            self.send(P.event("session.updated", session=self._session_json()))
        elif isinstance(event, P.ItemCreate):
            self.replies.interrupt("user_message")
            if self.config.logging.log_user_content:
                self.log.info("user text: %r", event.text)
            self.session.add_text(event.text)
            self.user_item_committed(None, event.text)
        elif isinstance(event, P.ResponseCreate):
            if self.replies.generating:
                raise P.ProtocolError(
                    "conversation_already_has_active_response",
                    "a response is in progress: send response.cancel first",
                    event.event_id,
                )
            self.replies.start(speech_stopped_s=None)
        elif isinstance(event, P.InputAudioCommit | P.InputAudioClear):
            if self.settings.turns.enabled:
                raise P.ProtocolError(
                    "turn_detection_enabled",
                    "server VAD commits turns itself; set turn_detection to null for push-to-talk",
                    event.event_id,
                )
            item_id = _new_id("item")
            self.listening.turn_audio_reset()
            if isinstance(event, P.InputAudioCommit):
                self.session.commit_audio()
                self.user_item_committed(item_id, None)
            else:
                self.session.discard_audio()
                self.send(P.event("input_audio_buffer.cleared"))
        elif isinstance(event, P.ResponseCancel):
            if not self.replies.active:
                raise P.ProtocolError(
                    "response_cancel_not_active", "there is no active response to cancel", event.event_id
                )
            self.replies.interrupt("client_cancelled")
        elif isinstance(event, P.OutputAudioClear):  # idempotent: clients send it after every cancel
            self.replies.interrupt("client_cancelled")
        elif isinstance(event, P.InputAudioAppend):
            if self.audio_in is None:
                raise P.ProtocolError(
                    "unknown_event",
                    "input_audio_buffer.append is for the WebSocket transport; "
                    "over WebRTC the audio comes on the track",
                    event.event_id,
                    "type",
                )
            self.audio_in(event.audio)
        elif isinstance(event, P.ItemRetrieve | P.ItemDelete | P.ItemTruncate):
            self._item_event(event)
        elif isinstance(event, P.Ping):
            self.send(P.event("glm4voice.pong", ping_event_id=event.event_id))

    def user_item_committed(self, item_id: str | None, text: str | None) -> None:
        """A user item is final: spoken (committed, transcript null) or typed. GA lifecycle events."""
        item = P.user_item(item_id or _new_id("item"), text)
        previous = self.conversation.add(item)
        if text is None:
            self.send(P.event("input_audio_buffer.committed", previous_item_id=previous, item_id=item["id"]))
        self.send(P.event("conversation.item.added", previous_item_id=previous, item=item))
        self.send(P.event("conversation.item.done", previous_item_id=previous, item=item))

    def _item_event(self, event: P.ItemRetrieve | P.ItemDelete | P.ItemTruncate) -> None:
        item = self.conversation.get(event.item_id)
        if item is None:
            raise P.ProtocolError(
                "item_not_found", f"no item {event.item_id!r} in this conversation", event.event_id, "item_id"
            )
        if isinstance(event, P.ItemRetrieve):
            self.send(P.event("conversation.item.retrieved", item=item))
            return
        ref = self.conversation.ref(event.item_id)
        if isinstance(event, P.ItemTruncate):
            if not isinstance(ref, Reply):
                raise P.ProtocolError(
                    "invalid_value", "only assistant items can be truncated", event.event_id, "item_id"
                )
            self.replies.truncate(event.item_id, ref, event.audio_end_ms)
            self.send(
                P.event(
                    "conversation.item.truncated",
                    item_id=event.item_id,
                    content_index=0,
                    audio_end_ms=event.audio_end_ms,
                )
            )
            return
        if isinstance(ref, Reply) and self.replies.in_progress(event.item_id):
            raise P.ProtocolError(
                "invalid_value",
                "this item's response is in progress (generating or playing): "
                "cancel it first (response.cancel), then delete the item",
                event.event_id,
                "item_id",
            )
        if isinstance(ref, int) and self.replies.running:
            raise P.ProtocolError(
                "conversation_already_has_active_response",
                "a response is in progress and may "
                "be answering this item: delete user items after its response.done",
                event.event_id,
                "item_id",
            )
        if ref is not None:
            try:
                self.session.delete_item(ref)
            except NotImplementedError as exc:
                raise P.ProtocolError("unsupported_value", str(exc), event.event_id, "item_id") from None
        self.conversation.remove(event.item_id)
        self.send(P.event("conversation.item.deleted", item_id=event.item_id))

    # ----- limits and liveness ---------------------------------------------------------------------

    async def _watch(self) -> None:
        while self.state is not CallState.CLOSED:
            await asyncio.sleep(WATCH_INTERVAL_S)
            ending = self.guard.check(
                time.monotonic(),
                replying=self.replies.active,
                connected=self.state is not CallState.CONNECTING,
            )
            if ending is not None:
                self.log.info("ending call: %s (%s)", ending.code, ending.message)
                if ending.notify:
                    await self.end(ending.code, ending.message)
                else:
                    self.metrics.ended(ending.code)
                    await self.close(ending.code, network_lost=ending.code == "peer_gone")
                return

    async def end(self, code: str, message: str) -> None:
        """Tell the client why the server ends the call (`glm4voice.call.closing`), then close it."""
        if self.state is CallState.CLOSED or self._ending:
            return
        self._ending = True
        self.metrics.ended(code)
        self.send(P.event("glm4voice.call.closing", reason=code, message=message))
        await self._flushed(CLOSING_FLUSH_S)
        await self.close(code)

    async def _flushed(self, timeout_s: float) -> None:
        """Wait until the data channel has handed every queued message to the transport (its
        `bufferedamountlow` event at threshold 0 fires after the SCTP send), at most `timeout_s`."""
        channel = self._channel
        if (
            channel is None
            or channel.readyState != "open"
            or channel.bufferedAmount <= channel.bufferedAmountLowThreshold
        ):
            return
        low = asyncio.get_running_loop().create_future()

        def on_low() -> None:
            if not low.done():
                low.set_result(None)

        channel.once("bufferedamountlow", on_low)
        try:
            await asyncio.wait_for(low, timeout_s)
        except TimeoutError:
            self.log.info("closing event not flushed within %.1f s", timeout_s)
        finally:
            channel.remove_listener("bufferedamountlow", on_low)

    # ----- the one way out -------------------------------------------------------------------------

    async def close(self, reason: str, network_lost: bool = False) -> None:
        """Free everything the call holds; safe to call from any path, any number of times. Each step is
        guarded and the call leaves the server's registry in any case: a step that fails (aiortc failing
        to close a half-negotiated connection) must not leave a ghost holding a call slot.
        `network_lost`: the peer went without a hangup; the conversation is parked for a resume."""
        if self.state is CallState.CLOSED:
            return
        self.state = CallState.CLOSED
        self.close_reason = reason
        self.log.info("closing: %s", reason)
        try:
            self._step("reply", self.replies.close)
            current = asyncio.current_task()
            tasks = [t for t in self._tasks if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._step("outbound track", self.track.stop)
            if network_lost and self._parking is not None and self.resume_token is not None:
                self._step("park", self._park)
            else:
                try:
                    await self.session.close()
                except Exception:
                    self.log.exception("responder session close failed")
            try:
                if self.pc is not None:
                    await asyncio.wait_for(self.pc.close(), PC_CLOSE_TIMEOUT_S)
            except Exception as exc:  # TimeoutError included
                self.log.warning("peer connection close failed: %s", repr(exc))
            self._step("listening", self.listening.reset)
        finally:
            try:
                self._on_closed(self)
            finally:
                self.closed.set()

    def _park(self) -> None:
        """The session (history, KV cache) waits for a resume; a half-spoken user turn is not kept."""
        self.session.discard_audio()
        self._parking.park(
            self.resume_token, ParkedCall(self.session, self.conversation, self.settings, self.call_id)
        )

    def _step(self, what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception:
            self.log.exception("closing: %s failed", what)

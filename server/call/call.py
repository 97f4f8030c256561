"""One call: user audio -> VAD -> turns -> responder -> the assistant's audio, plus the Realtime events.

Read it as a pipeline (moshi's server style): the call's `Listening` turns user audio into VAD
decisions and turn audio for the responder; its `ReplyFlow` moves each reply's events and audio to the
transport. The call itself holds the settings, the client events and the limits. It knows its
connection only through the `Transport` seam (server/call/transport.py), and a transport drives it
only through its public methods: `start`, `receive`, `hear`, `audio_arrived`, `connected`, `close`.
Control connections are observers (`observe`) whose events take the same per-call budget.
Every way a call can end goes through `close()`, which frees everything whatever fails inside it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine

import numpy as np

from pipeline.responder import (
    START,
    Reply,
    ReplyOptions,
    Responder,
    ResponderSession,
    TranscriptDelta,
    TranscriptDone,
    TranscriptFailed,
)
from server.audio.vad import SileroVad
from server.call.guard import CallGuard
from server.call.listening import Listening
from server.call.replies import ReplyFlow
from server.call.resume import ParkedCall, ParkedCalls, new_resume_token
from server.call.settings import CallSettings
from server.call.state import CallState
from server.call.transport import Transport
from server.config import Config
from server.logs import LogLimiter, call_tag, current_call_id, run_as_call
from server.metrics import Metrics
from server.realtime import events, fields, session_update
from server.realtime import protocol as P
from server.realtime.conversation import Conversation
from server.realtime.events import new_id as _new_id

log = logging.getLogger("glm4voice.call")
WATCH_INTERVAL_S = 0.5  # how often the watchdog checks duration, idle time and peer liveness
CLOSING_FLUSH_S = 0.5  # at most this long to get the closing event out before the connection goes
RESUME_FAILED = {  # glm4voice.session.resume_failed reasons: this call starts a fresh conversation
    "expired": "the resume window of the dropped call ended; its conversation is gone",
    "already_resumed": "that resume token was used already (each is good for one reconnect)",
    "unknown": "no dropped call holds that resume token",
    "disabled": "this server keeps no dropped calls (limits.resume_window_s = 0)",
    "evicted": "the dropped call was closed to make room (for new calls, or its address parked too many)",
}
CONTROL_ONLY = (
    "a control connection may send session.update, conversation.item.create, response.create and "
    "response.cancel"
)


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
        transport: Transport,
        responder: Responder,
        vad: SileroVad,
        config: Config,
        metrics: Metrics,
        settings: CallSettings,
        on_closed: Callable[[Call], None],
        parking: ParkedCalls | None = None,
        resumed: ParkedCall | str | None = None,
        address: str = "",
    ) -> None:
        """`parking`: where a dropped call leaves its conversation (server/call/resume.py), if its
        transport can be resumed; `resumed`: the conversation this call continues, or why the one asked
        for could not be resumed; `address`: the client's (parked calls are capped per address)."""
        self.call_id = call_id
        self.address = address
        self.transport = transport
        self.config = config
        self.metrics = metrics
        info = responder.info()
        self._transcribes = isinstance(info.details.get("transcription"), dict)  # the stage is loaded
        if not self._transcribes:
            settings = settings.without_transcription()
        self.settings = settings
        self.created_s = time.monotonic()
        self.state = CallState.CONNECTING
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._on_closed = on_closed
        self._responder_name = info.name
        self._parking = parking if transport.resumable else None
        self.resume_token = new_resume_token() if self._parking is not None else None
        self._resumed = resumed
        if isinstance(resumed, ParkedCall):
            self.session: ResponderSession = resumed.session
            self.session.update(settings.responder_settings())
        else:
            self.session = responder.open_session(call_id, settings.responder_settings())
        self._observers: list[Callable[[str], None]] = []  # control connections: a copy of every event
        # False: the client takes OpenAI's event types only, and our `glm4voice.*` events are not sent to it
        # (clients that fail on a type they do not know; docs/protocol.md "WebSocket transport").
        self.extension_events = True
        self._cut_ms: dict[str, int] = {}  # assistant item -> the audio_end_ms it was truncated to
        self.conversation = resumed.conversation if isinstance(resumed, ParkedCall) else Conversation()
        self._tasks: set[asyncio.Task] = set()
        self._ending = False  # end() is telling the client; a second reason is not sent
        self.log = CallLog(log, {"call_id": call_id})
        self.replies = ReplyFlow(
            self.session,
            metrics,
            self.send,
            self.spawn,
            self._reply_phase,
            self.log,
            self.conversation,
            transport.audio,
            transport.plays_out,
        )
        self.guard = CallGuard(config.limits, self.created_s)
        self._event_failures = LogLimiter()  # a client repeating an event that fails: one line per interval
        self.listening = Listening(self, vad)
        self.spawn(self._watch(), "watchdog")
        self.spawn(self._transcripts(), "transcripts")

    # ----- what a transport calls -------------------------------------------------------------------

    def start(self) -> None:
        """The transport carries events now: `session.created` (with the resume token), then whether the
        conversation asked for was resumed."""
        resume = (
            {"resume_token": self.resume_token, "resume_window_s": self._parking.window_s}
            if self._parking is not None
            else {}
        )
        self.send(events.event("session.created", session=self._session_json(), **resume))
        if isinstance(self._resumed, ParkedCall):
            self.send(events.event("glm4voice.session.resumed", items=len(self.conversation)))
        elif self._resumed is not None:
            self.send(
                events.event(
                    "glm4voice.session.resume_failed",
                    reason=self._resumed,
                    message=RESUME_FAILED[self._resumed],
                )
            )
        self._resumed = None  # the parked call's objects now belong to this call

    def hear(self, chunk: np.ndarray) -> None:
        """One (512,) float32 16 kHz chunk of user audio."""
        self.listening.feed_chunk(chunk)

    def audio_arrived(self, duration_s: float) -> bool:
        """User audio of `duration_s` arrived: False if it runs ahead of real time and is to be dropped."""
        return self.listening.accept_audio(duration_s)

    def observe(self, send: Callable[[str], None]) -> Callable[[], None]:
        """A control connection gets a copy of every event; returns what stops it."""
        self._observers.append(send)
        return lambda: self._observers.remove(send) if send in self._observers else None

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

    def spawn(self, coro: Coroutine, name: str) -> asyncio.Task:
        """A task of the call: cancelled when it closes; a failure is logged and sent as an error."""
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
                events.error_event(
                    "server_error", f"internal error in {task.get_name()}", error_type="server_error"
                )
            )

    # ----- outbound events -------------------------------------------------------------------------

    def send(self, message: dict) -> None:
        text = events.dumps(message)
        for observer in self._observers:
            observer(text)
        if self.extension_events or not message["type"].startswith("glm4voice."):
            self.transport.send(text)

    def _session_json(self) -> dict:
        s = self.settings
        return events.session_object(
            self.call_id,
            s.instructions,
            s.turn_detection_json(),
            s.sampling,
            self._responder_name,
            s.input_format,
            s.output_format,
            s.ignored,
            s.transcription,
        )

    # ----- client events ---------------------------------------------------------------------------

    def receive(
        self,
        message: str | bytes,
        only: tuple[type[P.ClientEvent], ...] | None = None,
        answer: Callable[[dict], None] | None = None,
    ) -> None:
        """A client event from the transport (or, `only` the events it may send, from a control
        connection; `answer`: where its errors go). Whatever goes wrong, nothing escapes into the caller
        (aiortc's receive loop would end, and the call with it): a failure is one `error` event and a
        rate-limited log line."""
        token = current_call_id.set(self.call_id)
        try:
            self._receive(message, only, answer or self.send)
        except Exception:
            self._event_failed(None, answer or self.send)
        finally:
            current_call_id.reset(token)

    def _event_failed(self, event_id: str | None, answer: Callable[[dict], None]) -> None:
        """Handling a client event raised (a bug): `error server_error` naming the event, one log line
        per interval; the call goes on."""
        self.metrics.events_failed.inc()
        allow, suppressed = self._event_failures.allow()
        if allow:
            self.log.exception(
                "client event failed%s", f" ({suppressed} more since the last line)" if suppressed else ""
            )
        try:
            answer(
                events.error_event(
                    "server_error",
                    "the event could not be handled; the call goes on",
                    event_id=event_id,
                    error_type="server_error",
                )
            )
        except Exception:  # the channel itself is failing; the close path will notice
            pass

    def _receive(
        self,
        message: str | bytes,
        only: tuple[type[P.ClientEvent], ...] | None,
        answer: Callable[[dict], None],
    ) -> None:
        limits = self.config.limits
        accept, complain = self.guard.event_arrived(time.monotonic())
        if not accept:
            self.metrics.events_dropped.inc()
            if complain:
                answer(
                    events.error_event(
                        "rate_limited",
                        f"more than {limits.max_events_per_s:g} events per second: "
                        f"events are being dropped ({self.guard.events_dropped} so far)",
                        event_id=P.peek_event_id(message),  # the dropped event that complains
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
            if only is not None and not isinstance(event, only):
                raise fields.ProtocolError("unsupported_value", CONTROL_ONLY, event.event_id, "type")
            if self._makes_engine_work(event):
                self._charge(event)
            self.handle_event(event)
        except fields.ProtocolError as exc:
            answer(events.error_event(exc.code, exc.message, event_id=exc.event_id, param=exc.param))
        except Exception:
            self._event_failed(event.event_id, answer)

    def _charge(self, event: P.ClientEvent) -> None:
        """An event that makes the engine prefill (a reply; new instructions re-prefill the system
        prompt; a truncate or delete of the history re-prefills what follows the edit) takes from its own,
        lower rate, whatever door it came by, so one caller cannot keep the shared engine busy."""
        if not self.guard.expensive_event(time.monotonic()):
            raise fields.ProtocolError(
                "rate_limited",
                f"response.create, instructions changes, truncates and deletes are limited to "
                f"{self.config.limits.max_expensive_events_per_s:g} per second: this one was dropped",
                event.event_id,
            )

    def _makes_engine_work(self, event: P.ClientEvent) -> bool:
        """Charged before they are handled (truncates and deletes are charged once they are found valid,
        in `_item_event`)."""
        if isinstance(event, P.ResponseCreate):
            return True
        return isinstance(event, session_update.SessionUpdate) and event.instructions not in (
            None,
            self.settings.instructions,
        )

    def handle_event(self, event: P.ClientEvent) -> None:
        if isinstance(event, session_update.SessionUpdate):
            self.settings = self.settings.apply(event)
            if not self._transcribes:
                self.settings = self.settings.without_transcription()
            self.listening.settings_changed()
            self.session.update(self.settings.responder_settings())
            self.send(events.event("session.updated", session=self._session_json()))
        elif isinstance(event, P.ItemCreate):
            self._create_item(event)
        elif isinstance(event, P.ResponseCreate):
            if self.replies.generating:
                raise fields.ProtocolError(
                    "conversation_already_has_active_response",
                    "Conversation already has an active response in progress: send response.cancel first",
                    event.event_id,
                )
            options = None if event.instructions is None else ReplyOptions(instructions=event.instructions)
            self.replies.start(None, options, event.metadata, event.event_id)
        elif isinstance(event, P.InputAudioCommit | P.InputAudioClear):
            if self.settings.turns.enabled:
                raise fields.ProtocolError(
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
                self.send(events.event("input_audio_buffer.cleared"))
        elif isinstance(event, P.ResponseCancel):
            if self.replies.current is None:
                raise fields.ProtocolError(
                    "response_cancel_not_active",
                    "Cancellation failed: no active response found",
                    event.event_id,
                )
            self.replies.interrupt("client_cancelled")
        elif isinstance(event, P.OutputAudioClear):  # idempotent: clients send it after every cancel
            self.replies.interrupt("client_cancelled")
        elif isinstance(event, P.InputAudioAppend):  # a WebSocket transport takes these itself
            raise fields.ProtocolError(
                "unknown_event",
                "input_audio_buffer.append is for the WebSocket transport; "
                "over WebRTC the audio comes on the track",
                event.event_id,
                "type",
            )
        elif isinstance(event, P.ItemRetrieve | P.ItemDelete | P.ItemTruncate):
            self._item_event(event)
        elif isinstance(event, P.Ping):
            self.send(events.event("glm4voice.pong", ping_event_id=event.event_id))

    def _create_item(self, event: P.ItemCreate) -> None:
        """A text message of any role, at the end or where `previous_item_id` says. A user message cuts
        off the reply playing (the user spoke); text of another role (a system note, a tool result, a
        synced history) goes in without interrupting."""
        item_id, previous = event.item_id, event.previous_item_id
        if item_id is not None and self.conversation.get(item_id) is not None:
            raise fields.ProtocolError(
                "item_create_duplicate_item_id",
                f"an item with id {item_id!r} is already in the conversation",
                event.event_id,
                "item.id",
            )
        if previous is not None and previous != P.ROOT and self.conversation.get(previous) is None:
            raise fields.ProtocolError(
                "item_create_invalid_previous_item_id",
                f"previous_item_id {previous!r} is not in the conversation: the item was not added",
                event.event_id,
                "previous_item_id",
            )
        if previous == self.conversation.last_id():
            previous = None  # right after the last item: at the end
        after = None if previous is None else START if previous == P.ROOT else self.conversation.ref(previous)
        if event.role == "user":
            self.replies.interrupt("user_message")
            if self.config.logging.log_user_content:
                self.log.info("user text: %r", event.text)
        try:
            if event.role == "user" and after is None:
                self.session.add_text(event.text)
            else:
                self.session.add_message(event.role, event.text, after)
        except NotImplementedError as exc:
            raise fields.ProtocolError("unsupported_value", str(exc), event.event_id, "item.role") from None
        item = events.message_item(item_id or _new_id("item"), event.role, event.text)
        previous_id = self.conversation.add(item, after=previous)
        self.send(events.event("conversation.item.added", previous_item_id=previous_id, item=item))
        self.send(events.event("conversation.item.done", previous_item_id=previous_id, item=item))

    def user_item_committed(self, item_id: str | None, text: str | None) -> None:
        """A user item is final: spoken (committed, transcript null) or typed. GA lifecycle events."""
        item = events.user_item(item_id or _new_id("item"), text)
        previous = self.conversation.add(item)
        if text is None:
            self.send(
                events.event("input_audio_buffer.committed", previous_item_id=previous, item_id=item["id"])
            )
        self.send(events.event("conversation.item.added", previous_item_id=previous, item=item))
        self.send(events.event("conversation.item.done", previous_item_id=previous, item=item))

    async def _transcripts(self) -> None:
        """The responder's transcripts of spoken user items, as Realtime events on those items (and in the
        items `conversation.item.retrieve` returns). An item deleted meanwhile gets none."""
        async for event in self.session.transcripts():
            item_id = self.conversation.user_item_id(event.item)
            if item_id is None:
                continue
            if isinstance(event, TranscriptDelta):
                self.send(events.transcription_delta(item_id, event.text))
            elif isinstance(event, TranscriptDone):
                self.conversation.replace(events.user_item(item_id, None, transcript=event.text))
                self.send(events.transcription_completed(item_id, event.text, event.audio_ms / 1000))
            elif isinstance(event, TranscriptFailed):
                self.send(events.transcription_failed(item_id, event.code, event.message))

    def _item_event(self, event: P.ItemRetrieve | P.ItemDelete | P.ItemTruncate) -> None:
        item = self.conversation.get(event.item_id)
        if item is None:
            kind = {P.ItemRetrieve: "retrieve", P.ItemDelete: "delete", P.ItemTruncate: "truncate"}[
                type(event)
            ]
            raise fields.ProtocolError(
                f"item_{kind}_invalid_item_id",
                f"Item with item_id {event.item_id!r} not found in this conversation",
                event.event_id,
                "item_id",
            )
        if isinstance(event, P.ItemRetrieve):
            self.send(events.event("conversation.item.retrieved", item=item))
            return
        ref = self.conversation.ref(event.item_id)
        if isinstance(event, P.ItemTruncate):
            if not isinstance(ref, Reply):
                raise fields.ProtocolError(
                    "invalid_value", "only assistant items can be truncated", event.event_id, "item_id"
                )
            cut_ms = self._cut_ms.get(event.item_id)
            if cut_ms is not None and event.audio_end_ms >= cut_ms:
                raise fields.ProtocolError(
                    "invalid_value",
                    f"the item was truncated at {cut_ms} ms already; a truncate can only shorten it",
                    event.event_id,
                    "audio_end_ms",
                )
            self._charge(event)
            self._cut_ms[event.item_id] = event.audio_end_ms
            self.replies.truncate(event.item_id, ref, event.audio_end_ms)
            self.send(
                events.event(
                    "conversation.item.truncated",
                    item_id=event.item_id,
                    content_index=0,
                    audio_end_ms=event.audio_end_ms,
                )
            )
            return
        current = self.replies.current
        if isinstance(ref, Reply) and current is not None and current.item_id == event.item_id:
            raise fields.ProtocolError(
                "invalid_value",
                "this item's response is in progress (generating or playing): "
                "cancel it first (response.cancel), then delete the item",
                event.event_id,
                "item_id",
            )  # once cut off it may go at once: the responder stops it before it edits the history
        if isinstance(ref, int) and self.replies.generating_items:
            raise fields.ProtocolError(
                "conversation_already_has_active_response",
                "a response is in progress and may "
                "be answering this item: delete message items after its response.done",
                event.event_id,
                "item_id",
            )
        if ref is not None:
            self._charge(event)
            try:
                self.session.delete_item(ref)
            except NotImplementedError as exc:
                raise fields.ProtocolError("unsupported_value", str(exc), event.event_id, "item_id") from None
        self.conversation.remove(event.item_id)
        self._cut_ms.pop(event.item_id, None)
        self.send(events.event("conversation.item.deleted", item_id=event.item_id))

    # ----- limits and liveness ---------------------------------------------------------------------

    async def _watch(self) -> None:
        while self.state is not CallState.CLOSED:
            await asyncio.sleep(WATCH_INTERVAL_S)
            ending = self.guard.check(
                time.monotonic(),
                replying=self.replies.current is not None,
                connected=self.state is not CallState.CONNECTING,
            )
            if ending is not None:
                self.log.info("ending call: %s (%s)", ending.code, ending.message)
                if ending.notify:
                    if ending.client_fault:
                        self.send(events.error_event(ending.code, ending.message))
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
        self.send(events.event("glm4voice.call.closing", reason=code, message=message))
        await self.transport.flush(CLOSING_FLUSH_S)
        await self.close(code)

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
            self._step("outbound audio", self.transport.audio.stop)
            if network_lost and self._parking is not None and self.resume_token is not None:
                self._step("park", self._park)
            else:
                try:
                    await self.session.close()
                except Exception:
                    self.log.exception("responder session close failed")
            try:
                await self.transport.close()
            except Exception:
                self.log.exception("closing: the transport failed")
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
            self.resume_token,
            ParkedCall(self.session, self.conversation, self.settings, self.call_id, self.address),
        )

    def _step(self, what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception:
            self.log.exception("closing: %s failed", what)

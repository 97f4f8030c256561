"""One call: user audio -> VAD -> turns -> responder -> the assistant's audio, plus the Realtime events.

Read it as a pipeline (moshi's server style): the call's `Listening` turns user audio into VAD
decisions and turn audio for the responder; its `ReplyFlow` moves each reply's events and audio to the
transport; its `ClientEvents` takes each client event to its handler (server/call/client_events.py),
and its `Items` keeps the conversation (server/call/items.py). The call itself holds the settings and
the limits, and owns the tasks, the watchdog and the way out. It knows its connection only through the
`Transport` seam (server/call/transport.py), and a transport drives it only through its public methods:
`start`, `receive`, `hear`, `audio_arrived`, `connected`, `close`.
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

from pipeline.responder import Responder, ResponderSession
from server.audio.vad import SileroVad
from server.call.client_events import ClientEvents
from server.call.guard import CallGuard
from server.call.items import Items
from server.call.listening import Listening
from server.call.replies import ReplyFlow
from server.call.resume import ParkedCall, ParkedCalls, new_resume_token
from server.call.settings import CallSettings
from server.call.state import CallState
from server.call.transport import Transport
from server.config import Config
from server.logs import call_tag, run_as_call
from server.metrics import Metrics
from server.realtime import events, fields, session_update
from server.realtime import protocol as P
from server.realtime.conversation import Conversation

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
        # control connections: a copy of every event (ours only to those that take them)
        self._observers: list[tuple[Callable[[str], None], bool]] = []
        # Our `glm4voice.*` events reach the client only if it asked (server/admission.py; docs/protocol.md
        # "Extension events"): some OpenAI clients fail on an event type they do not know.
        self.extension_events = False
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
        self.items = Items(self)
        self.listening = Listening(self, vad)
        self.client_events = ClientEvents(self)
        self.spawn(self._watch(), "watchdog")
        self.spawn(self.items.transcripts(), "transcripts")

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

    def observe(self, send: Callable[[str], None], extension_events: bool = True) -> Callable[[], None]:
        """A control connection gets a copy of every event (`glm4voice.*` ones if `extension_events`);
        returns what stops it."""
        observer = (send, extension_events)
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

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
        text, ours = events.dumps(message), message["type"].startswith("glm4voice.")
        for observer, takes_ours in self._observers:
            if takes_ours or not ours:
                observer(text)
        if self.extension_events or not ours:
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

    # ----- client events and the limits they take from ----------------------------------------------

    def receive(
        self,
        message: str | bytes,
        only: tuple[type[P.ClientEvent], ...] | None = None,
        answer: Callable[[dict], None] | None = None,
    ) -> None:
        """A client event from the transport, or from a control connection (`only` the events it may
        send; `answer`: where its errors go): server/call/client_events.py. Nothing escapes into the
        caller."""
        self.client_events.receive(message, only, answer)

    def update_session(self, update: session_update.SessionUpdate) -> None:
        self.settings = self.settings.apply(update)
        if not self._transcribes:
            self.settings = self.settings.without_transcription()
        self.listening.settings_changed()
        self.session.update(self.settings.responder_settings())
        self.send(events.event("session.updated", session=self._session_json()))

    def charge(self, event: P.ClientEvent) -> None:
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

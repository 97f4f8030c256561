"""A call that outlives its connections: connect, run the mode (hands-free, push-to-talk, half-duplex),
play typed turns, and reconnect with backoff when the network drops or the server restarts.

`Call.run()` returns (exit code, one line). Everything the call sees goes to `emit` as dicts: the server's
events as they arrive and the client's own, whose types start with `client.` (client/report.py prints them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import numpy as np

from client import ice, signalling
from client.audio_io import AudioSink, AudioSource
from client.connection import Connection, OutboundAudio
from client.errors import CallError, ExitCode, ServerRefused
from client.turns import Reply, TurnState, session_for

BACKOFF_S = (
    0.5,
    1.0,
    2.0,
    4.0,
    8.0,
)  # then 8 s apart: a restarting server is back in seconds, a tunnel in minutes
PTT_COMMIT_DELAY_S = 0.12  # after release, the last frames in flight reach the server before the commit
ENDED_BY_SERVER = (
    "max_duration",
    "idle_timeout",
)  # glm4voice.call.closing reasons that a reconnect would not fix


@dataclass(frozen=True)
class CallOptions:
    url: str  # http(s)://host:port of the server
    mode: str = "hands_free"  # client.turns.MODES
    token: str | None = None  # an API key or a client secret (ek_...), sent as Authorization: Bearer
    texts: tuple[str, ...] = ()  # typed turns, each sent once the previous reply has played
    instructions: str | None = None
    hang_up_when_done: bool = False  # a script (WAV file, typed turns): hang up once it has played out
    half_duplex_tail_ms: float = (
        300.0  # the mic stays closed this long after a reply: speaker latency + room decay
    )
    reconnect_window_s: float = 60.0  # keep trying this long after a loss (or at start), then exit NETWORK
    done_quiet_s: float = 2.0  # a finished script hangs up after this long with nobody talking


class Call:
    def __init__(
        self, options: CallOptions, source: AudioSource, sink: AudioSink, emit: Callable[[dict], None]
    ) -> None:
        self.options = options
        self.base_url = options.url.rstrip("/")
        self.session = session_for(options.mode, options.instructions)
        self._source = source
        self._sink = sink
        self._emit = emit
        self.turns = TurnState()
        self.resume_token: str | None = (
            None  # kept from session.created once the server offers one (docs/client.md, resume)
        )
        self.connections = 0
        self._conn: Connection | None = None
        self._outcome: asyncio.Future[str] | None = None
        self._changed = asyncio.Event()  # any turn-state change: wakes the script and the done watch
        self._stop_requested = False
        self._talking = False  # push-to-talk pressed
        self._talk_tail_until_s = 0.0
        self._mic_closed_until_s = 0.0  # half-duplex: after a reply's playback
        self._texts_left = list(options.texts)
        self._silence_ms = 0.0  # the session's silence_duration_ms, to report how long a spoken turn was
        self._speech_start_ms: dict[str, float] = {}  # item_id -> audio_start_ms of speech in progress
        self._pressed_s = 0.0
        self._source_done = False

    # ----- the connection loop -------------------------------------------------------------------

    async def run(self) -> tuple[ExitCode, str]:
        loop = asyncio.get_running_loop()
        ice.offer_loopback_for(self.base_url)
        tasks = [loop.create_task(self._typed_turns()), loop.create_task(self._watch_done())]
        try:
            async with signalling.http_session() as http:
                return await self._connect_loop(http)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _connect_loop(self, http: aiohttp.ClientSession) -> tuple[ExitCode, str]:
        down_since_s, attempt = time.monotonic(), 0
        while True:
            try:
                await self._connect(http)
            except CallError as exc:
                attempt += 1
                delay_s = BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]
                if isinstance(exc, ServerRefused) and exc.retry_after_s is not None:
                    delay_s = max(delay_s, exc.retry_after_s)
                if (
                    not exc.retryable
                    or self._stop_requested
                    or time.monotonic() + delay_s - down_since_s > self.options.reconnect_window_s
                ):
                    return exc.code, str(exc)
                self._emit(
                    {
                        "type": "client.reconnecting",
                        "attempt": attempt,
                        "delay_s": delay_s,
                        "reason": str(exc),
                    }
                )
                if await self._stopped_within(delay_s):
                    return ExitCode.OK, "stopped"
                continue
            attempt = 0
            outcome = await self._outcome
            conn, self._conn = self._conn, None
            if outcome != "lost":
                await conn.close(http, self.base_url)  # hang up: the server frees the call at once
                return ExitCode.OK, outcome
            await conn.close(None, self.base_url)  # no hangup: the server may keep it for a resume
            self.turns.reset()
            self._changed.set()
            down_since_s = time.monotonic()

    async def _connect(self, http: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        self._emit({"type": "client.connecting", "url": self.base_url, "attempt": self.connections + 1})
        server_session = await signalling.fetch_session(http, self.base_url, self.options.token)
        self._outcome = loop.create_future()
        conn = Connection(
            OutboundAudio(self._source, self._sending), self._on_event, self._on_audio, self._on_lost
        )
        t0 = time.monotonic()
        try:
            answer = await conn.open(
                http, self.base_url, server_session, self.session, self.options.token, self.resume_token
            )
        except BaseException:
            await conn.close(None, self.base_url)
            raise
        self._conn = conn
        self.connections += 1
        self._emit(
            {
                "type": "client.connected",
                "call_id": answer.call_id,
                "connection": self.connections,
                "offer_to_open_ms": round((time.monotonic() - t0) * 1000),
            }
        )
        self._changed.set()

    def _finish(self, outcome: str) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(outcome)

    def _on_lost(self, reason: str) -> None:
        self._emit({"type": "client.lost", "reason": reason})
        self._finish("lost")

    async def _stopped_within(self, delay_s: float) -> bool:
        self._changed.clear()
        deadline = time.monotonic() + delay_s
        while not self._stop_requested and (remaining := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
            self._changed.clear()
        return self._stop_requested

    def stop(self) -> None:
        """End the call (Ctrl-C): hang up and return OK."""
        self._stop_requested = True
        self._changed.set()
        self._finish("stopped")

    # ----- events and audio ----------------------------------------------------------------------

    def send(self, event: dict) -> None:
        if self._conn is not None:
            self._conn.send(event)

    def _on_event(self, event: dict) -> None:
        now = time.monotonic()
        self._emit(event)
        kind = event.get("type")
        if kind == "session.created":
            session = event.get("session", {})
            self.resume_token = event.get("resume_token") or session.get("resume_token") or self.resume_token
            td = session.get("audio", {}).get("input", {}).get("turn_detection") or {}
            self._silence_ms = float(td.get("silence_duration_ms", 0))
        elif kind == "input_audio_buffer.speech_started":
            self._speech_start_ms[event.get("item_id", "")] = event.get("audio_start_ms", 0)
        elif kind == "input_audio_buffer.speech_stopped":
            start_ms = self._speech_start_ms.pop(event.get("item_id", ""), None)
            if start_ms is not None:
                spoken_ms = event.get("audio_end_ms", 0) - start_ms - self._silence_ms
                self._emit(
                    {
                        "type": "client.user_turn",
                        "kind": "spoken",
                        "item_id": event.get("item_id"),
                        "duration_s": round(max(spoken_ms, 0) / 1000, 1),
                    }
                )
        elif kind == "glm4voice.call.closing":
            self._finish(
                f"server ended the call: {event.get('reason')}"
                if event.get("reason") in ENDED_BY_SERVER
                else "lost"
            )
        ended = self.turns.on_event(event, now)
        if ended is not None:
            self._mic_closed_until_s = now + self.options.half_duplex_tail_ms / 1000
            # frames still in flight count for the reply: summarise it after the tail
            asyncio.get_running_loop().call_later(
                self.options.half_duplex_tail_ms / 1000, self._summarise, ended
            )
        self._changed.set()

    def _summarise(self, reply: Reply) -> None:
        if self.turns.ending is reply:
            self.turns.ending = None
        self._emit(reply.summary())
        self._changed.set()

    def _on_audio(self, pcm: np.ndarray) -> None:
        self._sink.push(pcm)
        self.turns.on_audio(pcm, time.monotonic(), self.turns.reply or self.turns.ending)

    def _sending(self) -> bool:
        """Per outbound frame: does the source's audio go out?"""
        if self._source.finished and not self._source_done:
            self._source_done = True
            self._changed.set()
        now = time.monotonic()
        if self.options.mode == "push_to_talk":
            return self._talking or now < self._talk_tail_until_s
        if self.options.mode == "half_duplex":
            return not self.turns.assistant_active and now >= self._mic_closed_until_s
        return True

    # ----- push-to-talk --------------------------------------------------------------------------

    def toggle_talk(self) -> None:
        """Push-to-talk: press (interrupting a reply), or release and commit the turn."""
        now = time.monotonic()
        if not self._talking:
            reply = self.turns.reply
            if reply is not None:  # talking over the assistant interrupts it, as barge-in would
                self.send(
                    {"type": "response.cancel"} if not reply.status else {"type": "output_audio_buffer.clear"}
                )
            self.send({"type": "input_audio_buffer.clear"})  # the silence sent while released is not the turn
            self._talking = True
            self._pressed_s = now
            self.turns.user_speaking = True
        else:
            self._talking = False
            self._talk_tail_until_s = now + PTT_COMMIT_DELAY_S
            self._emit(
                {
                    "type": "client.user_turn",
                    "kind": "spoken",
                    "item_id": None,
                    "duration_s": round(now - self._pressed_s, 1),
                }
            )
            asyncio.get_running_loop().call_later(PTT_COMMIT_DELAY_S, self._commit)
        self._emit({"type": "client.push_to_talk", "pressed": self._talking})
        self._changed.set()

    def _commit(self) -> None:
        self.send({"type": "input_audio_buffer.commit"})
        self.send({"type": "response.create"})
        self.turns.user_speaking = False
        self.turns.user_turn_ended(time.monotonic())
        self._changed.set()

    # ----- scripts: typed turns and the end of a WAV file ----------------------------------------

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def _typed_turns(self) -> None:
        while self._texts_left:
            while self._conn is None or not self.turns.idle:
                await self._wait_change()
            text = self._texts_left.pop(0)
            self.send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": text}],
                    },
                }
            )
            self.send({"type": "response.create"})
            self.turns.user_turn_ended(time.monotonic())
            self._emit({"type": "client.user_turn", "kind": "typed", "text": text})
            self._changed.set()

    def _script_over(self) -> bool:
        return self._source.finished and not self._texts_left and not self._talking

    async def _watch_done(self) -> None:
        """With hang_up_when_done: once the script is over and nobody has talked for done_quiet_s."""
        if not self.options.hang_up_when_done:
            return
        while True:
            if self._conn is not None and self._script_over() and self.turns.idle:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), self.options.done_quiet_s)
                except TimeoutError:
                    self._finish("done")
                    return
                continue
            await self._wait_change()

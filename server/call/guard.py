"""Per-call limits and liveness: event rate, call duration, idle time, a vanished peer, turn length.

Pure bookkeeping with explicit clocks (`time.monotonic()` seconds), so it is unit-testable; the call's
watchdog task (server/call/call.py) asks `check()` twice a second and ends the call with the reason it gives.

- Event rate: a token bucket of `max_events_per_s`, `event_burst` deep. An event over the rate is
  dropped with an `error` (`rate_limited`), at most one such error a second (a flood must not make
  us flood back). Events that make the shared engine work (`response.create`, new instructions) also
  take from a second bucket, `max_expensive_events_per_s`, `expensive_event_burst` deep.
  `conversation.item.truncate` and `conversation.item.delete` are expensive too: each edit of the
  history makes the engine prefill what follows the edit again.
- Inbound media: audio may arrive ahead of real time by at most `INBOUND_BURST_S` (a network stall
  catching up); frames past that are dropped before the resampler and the VAD, and a sender still
  over real time after `inbound_flood_s` of drops has its call ended (`inbound_flood`).
- WebSocket messages, appends (`input_audio_buffer.append`) included, are policed by count
  (`MAX_MESSAGES_PER_S`) and by bytes (`MAX_MESSAGE_BYTES_PER_S`) before they are parsed: once either
  budget is spent the socket is not read until it refills (TCP holds the client back), and a message
  over the byte budget is dropped unread; appends then by audio time (server/websocket/socket.py),
  other events by the event rate. Waits and drops count for the same flood rule as audio:
  `inbound_flood_s` of them end the call.
- Peer liveness: a browser sends an audio packet every 20 ms for as long as it is there (a muted
  track sends silence packets). No inbound packet and no data-channel message for `peer_timeout_s`
  once media has flowed means the peer is gone. Peers that send no audio (receive-only) are covered by
  the ICE consent checks (server/webrtc/rtc.py: every `consent_interval_s`, `consent_failures` misses end the
  call; ~33 s by default, a backstop), which also catch a vanished sender.
- Idle: no user speech and no client event for `idle_timeout_s` (the assistant talking is not user
  activity, but a reply in progress keeps the call open).
- Duration: `max_call_duration_s` since the call was created.
- Connecting: an answered offer whose peer never connects would hold a call slot; after
  `connect_timeout_s` it is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from server.config import LimitsConfig

RATE_ERROR_INTERVAL_S = 1.0
INBOUND_RATE = (
    1.02  # inbound audio s per wall-clock s: real time, and 2 % for the peers' clocks drifting apart
)
INBOUND_BURST_S = 1.0  # audio a sender may get ahead by: a 1 s network stall delivered at once
FLOOD_QUIET_S = 1.0  # no drop for this long ends a flood (the next drop starts a new one)
MAX_MESSAGES_PER_S = 100.0  # WebSocket messages a second: clients append every 20-100 ms, plus events
MESSAGE_BURST = 200  # messages at once above that rate (a client catching up after a stall)
MAX_MESSAGE_BYTES_PER_S = 256 << 10  # WebSocket bytes a second: 4x real-time 24 kHz PCM in base64
MESSAGE_BYTES_BURST = 2 << 20  # bytes at once above that rate: two of the largest messages


@dataclass
class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` banked; `take()` spends `cost` (one) if there is that
    much. Tokens may be events, or seconds of audio."""

    rate_per_s: float
    burst: float
    tokens: float | None = None  # None: full at the first take
    t_s: float = 0.0

    def take(self, now_s: float | None = None, cost: float = 1.0) -> bool:
        now_s = time.monotonic() if now_s is None else now_s
        if self.tokens is None:
            self.tokens, self.t_s = float(self.burst), now_s
        self.tokens = min(float(self.burst), self.tokens + (now_s - self.t_s) * self.rate_per_s)
        self.t_s = now_s
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def spend(self, now_s: float, cost: float) -> bool:
        """Spend `cost` whether or not there is that much (the bucket goes into debt, at most `burst`
        deep): -> whether there was."""
        enough = self.take(now_s, cost)
        if not enough:
            self.tokens = max(-float(self.burst), self.tokens - cost)
        return enough

    def available(self, now_s: float) -> float:
        """Tokens now (negative: debt)."""
        self.take(now_s, 0.0)
        return self.tokens

    def wait_s(self) -> float:
        """Seconds until the next token."""
        return max(0.0, (1.0 - self.tokens) / self.rate_per_s)


@dataclass(frozen=True)
class Ending:
    code: str  # max_duration | idle_timeout | peer_gone | connect_timeout | inbound_flood
    message: str
    notify: bool  # whether the peer can still be told (not when it is gone)
    client_fault: bool = False  # the client broke a limit: it also gets an `error` event with the code


class CallGuard:
    def __init__(self, limits: LimitsConfig, now_s: float) -> None:
        self.limits = limits
        self.created_s = now_s
        self.last_activity_s = now_s  # user speech or a client event
        self.last_inbound_s: float | None = None  # last inbound audio frame (None: none yet)
        self.last_event_s = now_s  # last data-channel message, any
        self.events = TokenBucket(limits.max_events_per_s, limits.event_burst)
        self.events_dropped = 0
        self.expensive = TokenBucket(limits.max_expensive_events_per_s, limits.expensive_event_burst)
        self._last_rate_error_s = -RATE_ERROR_INTERVAL_S
        self.inbound = TokenBucket(INBOUND_RATE, INBOUND_BURST_S)
        self.inbound_frames_dropped = 0
        self.inbound_dropped_s = 0.0  # audio dropped, s
        self.flood_since_s: float | None = None  # first drop of the current run of drops
        self.last_drop_s = float("-inf")
        self.messages = TokenBucket(MAX_MESSAGES_PER_S, MESSAGE_BURST)
        self.message_bytes = TokenBucket(MAX_MESSAGE_BYTES_PER_S, MESSAGE_BYTES_BURST)
        self.messages_dropped = 0
        self._last_append_error_s = -RATE_ERROR_INTERVAL_S

    def inbound_frame(self, now_s: float, duration_s: float) -> bool:
        """An inbound audio frame of `duration_s` arrived: -> keep it (False: over real time, drop it)."""
        self.last_inbound_s = now_s
        if self.inbound.take(now_s, duration_s):
            return True
        self.inbound_frames_dropped += 1
        self.inbound_dropped_s += duration_s
        self.dropped(now_s)
        return False

    def dropped(self, now_s: float) -> None:
        """Inbound audio (a frame, an append) was dropped: one more drop of the current flood."""
        if now_s - self.last_drop_s >= FLOOD_QUIET_S:
            self.flood_since_s = now_s
        self.last_drop_s = now_s

    def read_pause_s(self, now_s: float) -> float:
        """How long a WebSocket waits before it reads its next message: 0 while its message and byte
        budgets last. While it waits the socket is not read, so TCP holds the client back at no cost to
        us; the wait counts as a flood drop (a flood of them for `inbound_flood_s` ends the call)."""
        messages, message_bytes = self.messages.available(now_s), self.message_bytes.available(now_s)
        if messages >= 1.0 and message_bytes > 0.0:
            return 0.0
        self.dropped(now_s)
        return max(
            (1.0 - messages) / self.messages.rate_per_s, -message_bytes / self.message_bytes.rate_per_s
        )

    def message_arrived(self, now_s: float, n_bytes: int) -> bool:
        """A WebSocket message of `n_bytes` arrived: -> read it (False: over the count or byte budget; it
        is dropped unread and counts as a flood drop; its bytes are owed all the same)."""
        self.last_event_s = now_s
        counted = self.messages.take(now_s)
        if self.message_bytes.spend(now_s, n_bytes) and counted:
            return True
        self.messages_dropped += 1
        self.dropped(now_s)
        return False

    def append_error_due(self, now_s: float) -> bool:
        """Whether a refused or malformed append gets its `error` now: at most one a second (a flood of
        bad appends must not make us flood back)."""
        if now_s - self._last_append_error_s >= RATE_ERROR_INTERVAL_S:
            self._last_append_error_s = now_s
            return True
        return False

    def expensive_event(self, now_s: float) -> bool:
        """-> whether an event that makes the engine work may go on now."""
        return self.expensive.take(now_s)

    def user_activity(self, now_s: float) -> None:
        self.last_activity_s = now_s

    def event_arrived(self, now_s: float) -> tuple[bool, bool]:
        """-> (process it, send a rate_limited error now)."""
        self.last_event_s = now_s
        if self.events.take(now_s):
            self.last_activity_s = now_s
            return True, False
        self.events_dropped += 1
        if now_s - self._last_rate_error_s >= RATE_ERROR_INTERVAL_S:
            self._last_rate_error_s = now_s
            return False, True
        return False, False

    def check(self, now_s: float, replying: bool, connected: bool = True) -> Ending | None:
        lim = self.limits
        if not connected:
            if lim.connect_timeout_s and now_s - self.created_s >= lim.connect_timeout_s:
                return Ending(
                    "connect_timeout", f"the peer did not connect within {lim.connect_timeout_s:g} s", False
                )
            return None
        if lim.max_call_duration_s and now_s - self.created_s >= lim.max_call_duration_s:
            return Ending(
                "max_duration", f"the call reached its limit of {lim.max_call_duration_s:g} s", True
            )
        if lim.peer_timeout_s and self.last_inbound_s is not None:
            heard_s = max(self.last_inbound_s, self.last_event_s)
            if now_s - heard_s >= lim.peer_timeout_s:
                return Ending(
                    "peer_gone", f"nothing received from the peer for {now_s - heard_s:.1f} s", False
                )
        if (
            lim.inbound_flood_s
            and self.flood_since_s is not None
            and now_s - self.last_drop_s < FLOOD_QUIET_S
            and self.last_drop_s - self.flood_since_s >= lim.inbound_flood_s
        ):
            return Ending(
                "inbound_flood",
                f"inbound audio faster than real time for {self.last_drop_s - self.flood_since_s:.0f} s",
                True,
                client_fault=True,
            )
        if lim.idle_timeout_s and not replying and now_s - self.last_activity_s >= lim.idle_timeout_s:
            return Ending("idle_timeout", f"no speech and no events for {lim.idle_timeout_s:g} s", True)
        return None

"""Per-call limits and liveness: event rate, call duration, idle time, a vanished peer, turn length.

Pure bookkeeping with explicit clocks (`time.monotonic()` seconds), so it is unit-testable; the call's
watchdog task (server/call.py) asks `check()` twice a second and ends the call with the reason it gives.

- Event rate: a token bucket of `max_events_per_s`, `event_burst` deep. An event over the rate is
  dropped with an `error` (`rate_limited`), at most one such error a second (a flood must not make
  us flood back).
- Peer liveness: a browser sends an audio packet every 20 ms for as long as it is there (a muted
  track sends silence packets). No inbound packet and no data-channel message for `peer_timeout_s`
  once media has flowed means the peer is gone. Peers that send no audio (receive-only) are covered by
  the ICE consent checks (server/rtc.py: every `consent_interval_s`, `consent_failures` misses end the
  call; ~33 s by default, a backstop), which also catch a vanished sender.
- Idle: no user speech and no client event for `idle_timeout_s` (the assistant talking is not user
  activity, but a reply in progress keeps the call open).
- Duration: `max_call_duration_s` since the call was created.
- Connecting: an answered offer whose peer never connects would hold a call slot; after
  `connect_timeout_s` it is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.config import LimitsConfig
from server.limits import TokenBucket

RATE_ERROR_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Ending:
    code: str  # max_duration | idle_timeout | peer_gone | connect_timeout
    message: str
    notify: bool  # whether the peer can still be told (not when it is gone)


class CallGuard:
    def __init__(self, limits: LimitsConfig, now_s: float) -> None:
        self.limits = limits
        self.created_s = now_s
        self.last_activity_s = now_s  # user speech or a client event
        self.last_inbound_s: float | None = None  # last inbound audio frame (None: none yet)
        self.last_event_s = now_s  # last data-channel message, any
        self.events = TokenBucket(limits.max_events_per_s, limits.event_burst)
        self.events_dropped = 0
        self._last_rate_error_s = -RATE_ERROR_INTERVAL_S

    def inbound_frame(self, now_s: float) -> None:
        self.last_inbound_s = now_s

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
                return Ending("connect_timeout", f"the peer did not connect within {lim.connect_timeout_s:g} s",
                              False)
            return None
        if lim.max_call_duration_s and now_s - self.created_s >= lim.max_call_duration_s:
            return Ending("max_duration", f"the call reached its limit of {lim.max_call_duration_s:g} s", True)
        if lim.peer_timeout_s and self.last_inbound_s is not None:
            heard_s = max(self.last_inbound_s, self.last_event_s)
            if now_s - heard_s >= lim.peer_timeout_s:
                return Ending("peer_gone", f"nothing received from the peer for {now_s - heard_s:.1f} s", False)
        if lim.idle_timeout_s and not replying and now_s - self.last_activity_s >= lim.idle_timeout_s:
            return Ending("idle_timeout", f"no speech and no events for {lim.idle_timeout_s:g} s", True)
        return None

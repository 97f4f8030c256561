"""The server's Prometheus metrics (`prometheus_client`, one registry per server) and the event-loop lag
probe. `/metrics` (server/edge/pages.py) renders the registry in the Prometheus text format."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
LAG_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
# Each counter would also get a `_created` series (its creation time): nothing reads it, and /metrics
# keeps the series it always had. Process-wide in prometheus_client.
prometheus_client.disable_created_metrics()


class LoopLagProbe:
    """Sleeps `interval_s` and records how late it woke: the loop's scheduling lag. `on_lag(lag_s)` is
    told each measurement (the server's metrics)."""

    def __init__(self, interval_s: float, window: int, on_lag: Callable[[float], None] | None = None) -> None:
        self.interval_s = interval_s
        self.recent_s: deque[float] = deque(maxlen=window)
        self.max_s = 0.0
        self._on_lag = on_lag
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.interval_s)
            lag_s = max(0.0, time.monotonic() - before - self.interval_s)
            self.recent_s.append(lag_s)
            self.max_s = max(self.max_s, lag_s)
            if self._on_lag is not None:
                self._on_lag(lag_s)

    def quantile_s(self, q: float) -> float:
        if not self.recent_s:
            return 0.0
        ordered = sorted(self.recent_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Metrics:
    """Every metric of one server, in its own registry (tests run several servers in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.active_calls = Gauge("glm4voice_active_calls", "Calls connected now.", registry=r)
        self.calls = Counter("glm4voice_calls", "Calls accepted since start.", registry=r)
        self.calls_rejected = Counter(
            "glm4voice_calls_rejected", "Call offers refused, by reason.", ["reason"], registry=r
        )
        self.calls_ended = Counter(
            "glm4voice_calls_ended",
            "Calls the server ended (limits, liveness, shutdown), by reason.",
            ["reason"],
            registry=r,
        )
        self.events_dropped = Counter(
            "glm4voice_events_dropped", "Data-channel events dropped over the rate limit.", registry=r
        )
        self.events_failed = Counter(
            "glm4voice_events_failed",
            "Data-channel events whose handling failed (server_error sent).",
            registry=r,
        )
        self.inbound_frames_dropped = Counter(
            "glm4voice_inbound_frames_dropped",
            "Inbound audio frames dropped for arriving over real time.",
            registry=r,
        )
        # The exported names say "turns" for replies: they are kept so that dashboards keep working.
        self.replies = Counter("glm4voice_turns", "Assistant replies started.", registry=r)
        self.replies_interrupted = Counter(
            "glm4voice_turns_interrupted", "Replies cut off by the user.", registry=r
        )
        self.reply_errors = Counter("glm4voice_turn_errors", "Replies that failed.", registry=r)
        self.outbound_underruns = Counter(
            "glm4voice_outbound_underruns",
            "Outbound frames sent short while a reply was arriving.",
            registry=r,
        )
        self.reply_latency = Histogram(
            "glm4voice_turn_latency_seconds",
            "End of user speech (VAD decision) to the reply's first outbound frame.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.loop_lag = Histogram(
            "glm4voice_event_loop_lag_seconds",
            "How late the event loop woke a periodic probe.",
            buckets=LAG_BUCKETS_S,
            registry=r,
        )
        self.loop_lag_max = Gauge("glm4voice_event_loop_lag_max_seconds", "Largest lag seen.", registry=r)
        self.address_blocks = Counter(
            "glm4voice_address_blocks", "Client addresses put in the penalty box.", registry=r
        )
        self.blocked_refusals = Counter(
            "glm4voice_blocked_refusals",
            "Connections and requests refused because their address was blocked.",
            registry=r,
        )
        self._lag_max_s = 0.0

    def reject(self, reason: str) -> None:
        self.calls_rejected.labels(reason).inc()

    def ended(self, reason: str) -> None:
        self.calls_ended.labels(reason).inc()

    def lag(self, lag_s: float) -> None:
        self.loop_lag.observe(lag_s)
        self._lag_max_s = max(self._lag_max_s, lag_s)
        self.loop_lag_max.set(self._lag_max_s)

    def value(self, name: str, **labels: str) -> float:
        """A sample's value by its exported name (`glm4voice_calls_total`), 0 if it has none yet."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self, active_calls: int) -> str:
        self.active_calls.set(active_calls)
        return generate_latest(self.registry).decode("utf-8")

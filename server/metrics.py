"""Prometheus text metrics (no client library) and the event-loop lag probe."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
LAG_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        lines.append(f"{name}_sum {self.total:.6f}")
        lines.append(f"{name}_count {self.n}")
        return lines


class LoopLagProbe:
    """Sleeps `interval_s` and records how late it woke: the loop's scheduling lag."""

    def __init__(self, interval_s: float, window: int) -> None:
        self.interval_s = interval_s
        self.recent_s: deque[float] = deque(maxlen=window)
        self.histogram = Histogram(LAG_BUCKETS_S)
        self.max_s = 0.0
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
            self.histogram.observe(lag_s)
            self.max_s = max(self.max_s, lag_s)

    def quantile_s(self, q: float) -> float:
        if not self.recent_s:
            return 0.0
        ordered = sorted(self.recent_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Metrics:
    calls_total: int = 0
    calls_rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    replies_total: int = 0
    replies_interrupted: int = 0
    reply_errors: int = 0
    outbound_underruns: int = 0
    calls_ended: dict[str, int] = field(
        default_factory=dict
    )  # server-side ending (limits, liveness) -> count
    events_dropped: int = 0  # data-channel events over the rate limit
    events_failed: int = 0  # data-channel events whose handling raised (answered with server_error)
    inbound_frames_dropped: int = 0  # inbound audio frames over real time
    reply_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))

    def reject(self, reason: str) -> None:
        self.calls_rejected[reason] = self.calls_rejected.get(reason, 0) + 1

    def ended(self, reason: str) -> None:
        self.calls_ended[reason] = self.calls_ended.get(reason, 0) + 1

    def render(self, active_calls: int, lag: LoopLagProbe | None) -> str:
        lines = [
            "# HELP glm4voice_active_calls Calls connected now.",
            "# TYPE glm4voice_active_calls gauge",
            f"glm4voice_active_calls {active_calls}",
            "# HELP glm4voice_calls_total Calls accepted since start.",
            "# TYPE glm4voice_calls_total counter",
            f"glm4voice_calls_total {self.calls_total}",
            "# HELP glm4voice_calls_rejected_total Call offers refused, by reason.",
            "# TYPE glm4voice_calls_rejected_total counter",
        ]
        lines += [
            f'glm4voice_calls_rejected_total{{reason="{r}"}} {n}'
            for r, n in sorted(self.calls_rejected.items())
        ]
        lines += [
            "# HELP glm4voice_calls_ended_total Calls the server ended (limits, liveness, shutdown), by reason.",
            "# TYPE glm4voice_calls_ended_total counter",
        ]
        lines += [
            f'glm4voice_calls_ended_total{{reason="{r}"}} {n}' for r, n in sorted(self.calls_ended.items())
        ]
        lines += [
            "# HELP glm4voice_events_dropped_total Data-channel events dropped over the rate limit.",
            "# TYPE glm4voice_events_dropped_total counter",
            f"glm4voice_events_dropped_total {self.events_dropped}",
            "# HELP glm4voice_events_failed_total Data-channel events whose handling failed (server_error sent).",
            "# TYPE glm4voice_events_failed_total counter",
            f"glm4voice_events_failed_total {self.events_failed}",
            "# HELP glm4voice_inbound_frames_dropped_total Inbound audio frames dropped for arriving over real time.",
            "# TYPE glm4voice_inbound_frames_dropped_total counter",
            f"glm4voice_inbound_frames_dropped_total {self.inbound_frames_dropped}",
            "# HELP glm4voice_turns_total Assistant replies started.",
            "# TYPE glm4voice_turns_total counter",
            f"glm4voice_turns_total {self.replies_total}",
            "# HELP glm4voice_turns_interrupted_total Replies cut off by the user.",
            "# TYPE glm4voice_turns_interrupted_total counter",
            f"glm4voice_turns_interrupted_total {self.replies_interrupted}",
            "# HELP glm4voice_turn_errors_total Replies that failed.",
            "# TYPE glm4voice_turn_errors_total counter",
            f"glm4voice_turn_errors_total {self.reply_errors}",
            "# HELP glm4voice_outbound_underruns_total Outbound frames sent short while a reply was arriving.",
            "# TYPE glm4voice_outbound_underruns_total counter",
            f"glm4voice_outbound_underruns_total {self.outbound_underruns}",
        ]
        lines += self.reply_latency.render(
            "glm4voice_turn_latency_seconds",
            "End of user speech (VAD decision) to the reply's first outbound frame.",
        )
        if lag is not None:
            lines += lag.histogram.render(
                "glm4voice_event_loop_lag_seconds", "How late the event loop woke a periodic probe."
            )
            lines += [
                "# HELP glm4voice_event_loop_lag_max_seconds Largest lag seen.",
                "# TYPE glm4voice_event_loop_lag_max_seconds gauge",
                f"glm4voice_event_loop_lag_max_seconds {lag.max_s:.6f}",
            ]
        return "\n".join(lines) + "\n"

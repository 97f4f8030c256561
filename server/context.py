"""What every route shares: config, the responder and its readiness, the VAD model, live calls, metrics,
admission and auth. `server/app.py` builds one (`Server`, which adds the lifecycle); the route modules
(signalling, client secrets, pages) take it."""

from __future__ import annotations

import secrets
import time

from pipeline.responder import Responder
from server.audio.vad import SileroVad
from server.call.call import Call
from server.call.resume import ParkedCalls
from server.call.settings import CallSettings
from server.config import Config
from server.edge.auth import Auth
from server.edge.limits import Admission
from server.edge.penalties import ABUSE_ENDINGS, Penalties
from server.metrics import LoopLagProbe, Metrics


class ServerContext:
    def __init__(self, config: Config, responder: Responder) -> None:
        self.config = config
        self.responder = responder
        self.vad = SileroVad()
        self.metrics = Metrics()
        self.lag = LoopLagProbe(
            config.metrics.loop_lag_interval_ms / 1000.0, config.metrics.loop_lag_window, self.metrics.lag
        )
        self.admission = Admission(config)
        self.penalties = Penalties(config.limits, self.metrics)
        self.auth = Auth(config.auth, config.http.public_url)
        self.calls: dict[str, Call] = {}  # call_id -> Call, so hangup can find its call
        self.parked = ParkedCalls(  # dropped calls' conversations, for a resume
            config.limits.resume_window_s,
            config.limits.max_parked_calls,
            config.limits.max_parked_per_address,
        )
        self.started_s = time.monotonic()
        self.start_error: str | None = None  # the responder failed to start (or died): why

    def ready(self) -> bool:
        return self.start_error is None and self.responder.info().ready

    def not_ready_reason(self) -> str | None:
        """Why the responder cannot serve (None: it is ready, or still loading)."""
        if self.start_error:
            return self.start_error
        info = self.responder.info()
        if info.ready:
            return None
        return info.details.get("error")

    def occupied_slots(self) -> int:
        """KV slots in use: live calls and parked conversations (a new call closes a parked one for its
        slot: server/admission.py)."""
        return len(self.calls) + len(self.parked)

    def call_holding(self, resume_token: str) -> Call | None:
        """The live call whose resume token this is (its client reconnects before its drop was noticed)."""
        return next(
            (
                c
                for c in self.calls.values()
                if c.resume_token is not None
                and secrets.compare_digest(c.resume_token.encode(), resume_token.encode())
            ),
            None,
        )

    def default_settings(self) -> CallSettings:
        return CallSettings.defaults(self.config.turn_detection)

    def forget(self, call: Call) -> None:
        """A call's last act (`Call.close`, in a finally): its slot is free."""
        weight = ABUSE_ENDINGS.get(call.close_reason or "", 0.0)
        if weight and call.address:
            self.penalties.strike(call.address, weight, f"call ended: {call.close_reason}")
        if self.calls.pop(call.call_id, None) is not None:
            self.metrics.outbound_underruns.inc(call.transport.audio.stats.underruns)

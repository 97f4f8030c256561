"""What every route shares: config, the responder and its readiness, the VAD model, live calls, metrics,
admission and auth. `server/app.py` builds one (`Server`, which adds the lifecycle); the route modules
(signalling, client secrets, pages) take it."""

from __future__ import annotations

import time

from pipeline.responder import Responder
from server.auth import Auth
from server.call import Call, CallSettings
from server.config import Config
from server.limits import Admission
from server.metrics import LoopLagProbe, Metrics
from server.vad import SileroVad


class ServerContext:
    def __init__(self, config: Config, responder: Responder) -> None:
        self.config = config
        self.responder = responder
        self.vad = SileroVad()
        self.metrics = Metrics()
        self.lag = LoopLagProbe(config.metrics.loop_lag_interval_ms / 1000.0, config.metrics.loop_lag_window)
        self.admission = Admission(config)
        self.auth = Auth(config.auth, config.http.public_url)
        self.calls: dict[str, Call] = {}  # call_id -> Call, so hangup can find its call
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

    def default_settings(self) -> CallSettings:
        return CallSettings.defaults(self.config.turn_detection)

    def forget(self, call: Call) -> None:
        """A call's last act (`Call.close`, in a finally): its slot is free."""
        if self.calls.pop(call.call_id, None) is not None:
            self.metrics.outbound_underruns += call.track.stats.underruns



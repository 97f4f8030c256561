"""What a browser or an operator reads: the page, `/session` (ICE servers, defaults), `/health`,
`/metrics`."""

from __future__ import annotations

import time
from pathlib import Path

import jinja2
from aiohttp import web

from server.context import ServerContext
from server.edge.limits import ApiError

ROOT = Path(__file__).resolve().parents[2]


class Pages:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self._templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(ROOT / "templates"), autoescape=jinja2.select_autoescape(["html"])
        )

    def ice_servers(self, with_turn: bool = True) -> list[dict]:
        w = self.ctx.config.webrtc
        servers: list[dict] = []
        if w.stun_urls:
            servers.append({"urls": list(w.stun_urls)})
        if w.turn_urls and with_turn:
            servers.append(
                {"urls": list(w.turn_urls), "username": w.turn_username, "credential": w.turn_credential}
            )
        return servers

    async def index(self, request: web.Request) -> web.Response:
        info = self.ctx.responder.info()
        html = self._templates.get_template("index.html").render(
            responder=info.name,
            demo=info.details.get("weights") == "demo",
            echo=info.name == "echo",
            ice_gather_timeout_ms=self.ctx.config.webrtc.ice_gather_timeout_ms,
        )
        return web.Response(text=html, content_type="text/html")

    async def session(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        info = ctx.responder.info()
        # With auth on, TURN credentials are relay capacity: only a caller who may create a call gets
        # them (the page asks again with its Authorization header once it has a client secret).
        turn_allowed = True
        if ctx.auth.enabled:
            try:
                ctx.auth.authorize_call(request)
            except ApiError:
                turn_allowed = False
        return web.json_response(
            {
                "ice_servers": self.ice_servers(with_turn=turn_allowed),
                "turn_withheld": bool(ctx.config.webrtc.turn_urls) and not turn_allowed,
                "ice_gather_timeout_ms": ctx.config.webrtc.ice_gather_timeout_ms,
                "responder": info.name,
                "demo_weights": info.details.get("weights") == "demo",
                "turn_detection": ctx.default_settings().turn_detection_json(),
                "calls_endpoint": "/v1/realtime/calls",
                "auth": {
                    "required": ctx.auth.enabled,
                    "page_secrets": ctx.auth.enabled and ctx.config.auth.page_secrets,
                    "client_secrets_endpoint": "/v1/realtime/client_secrets",
                },
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        info = ctx.responder.info()
        ready = ctx.ready()
        body = {
            "ready": ready,
            "responder": {
                "name": info.name,
                "ready": info.ready,
                "output_sample_rate_hz": info.output_sample_rate_hz,
                **info.details,
            },
            "active_calls": len(ctx.calls),
            "parked_calls": len(ctx.parked),  # dropped calls kept for a resume (each holds a call slot)
            "draining": ctx.admission.draining,
            "max_calls": ctx.config.limits.max_calls,
            "uptime_s": round(time.monotonic() - ctx.started_s, 1),
            "event_loop_lag_ms": {
                "p50": round(ctx.lag.quantile_s(0.5) * 1e3, 3),
                "p99": round(ctx.lag.quantile_s(0.99) * 1e3, 3),
                "max": round(ctx.lag.max_s * 1e3, 3),
            },
        }
        reason = ctx.not_ready_reason()
        if reason:
            body["error"] = reason
        return web.json_response(body, status=200 if ready and not ctx.admission.draining else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        text = self.ctx.metrics.render(len(self.ctx.calls))
        return web.Response(
            text=text,
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

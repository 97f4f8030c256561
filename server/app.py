"""HTTP routes: the page, Realtime-style call signalling, client secrets, /session, /health, /metrics.

One `offer` handler in the spirit of aiortc's example server; per-call state lives in `server/call.py`.
Every refusal goes through `ApiError` (server/limits.py), so errors have one JSON shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import jinja2
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from pipeline.responder import Responder, SamplingSettings
from server import protocol as P
from server.auth import Auth
from server.call import Call, CallSettings, new_call_id
from server.config import Config
from server.limits import Admission, ApiError, allowed_origin, check_origin
from server.logs import current_call_id
from server.metrics import LoopLagProbe, Metrics
from server.rtc import (
    SdpError,
    check_offer,
    filter_remote_candidates,
    set_consent_checks,
    set_host_addresses,
    set_receive_jitter,
)
from server.turns import TurnSettings
from server.vad import SileroVad

log = logging.getLogger("glm4voice.app")
ROOT = Path(__file__).resolve().parents[1]
SERVER_KEY: web.AppKey[Server] = web.AppKey("server")


class Server:
    """What the routes share: config, the responder, the VAD model, live calls, metrics."""

    def __init__(self, config: Config, responder: Responder) -> None:
        self.config = config
        self.responder = responder
        self.vad = SileroVad()
        self.metrics = Metrics()
        self.lag = LoopLagProbe(config.metrics.loop_lag_interval_ms / 1000.0, config.metrics.loop_lag_window)
        self.admission = Admission(config)
        self.auth = Auth(config.auth, config.http.public_url)
        self._monitor_task: asyncio.Task | None = None
        self._was_ready = False  # the responder has been ready once: not-ready now means it failed
        self.calls: dict[str, Call] = {}  # call_id -> Call, so hangup can find its call
        self.started_s = time.monotonic()
        self._start_task: asyncio.Task | None = None
        self.start_error: str | None = None
        self._templates = jinja2.Environment(loader=jinja2.FileSystemLoader(ROOT / "templates"),
                                             autoescape=jinja2.select_autoescape(["html"]))

    # ----- lifecycle -------------------------------------------------------------------------------

    async def startup(self, app: web.Application) -> None:
        set_host_addresses(self.config.webrtc.host_addresses)
        set_consent_checks(self.config.webrtc.consent_interval_s, self.config.webrtc.consent_failures)
        self.lag.start()
        loop = asyncio.get_running_loop()
        self._start_task = loop.create_task(self._start_responder(), name="responder-start")
        self._monitor_task = loop.create_task(self._monitor(), name="server-monitor")

    async def _start_responder(self) -> None:
        try:
            await self.responder.start()
            self._was_ready = True
            log.info("responder %s ready", self.responder.info().name)
        except Exception as exc:
            self.start_error = f"{type(exc).__name__}: {exc}"
            log.exception("responder failed to start")

    async def _monitor(self) -> None:
        """Once a second: a responder that was ready and is not any more (engine thread died) ends every
        call with a reason; expired client secrets are dropped."""
        while True:
            await asyncio.sleep(1.0)
            ready = self.ready()
            if ready:
                self._was_ready = True
            elif self._was_ready and self.calls:
                reason = self.not_ready_reason() or "the engine stopped"
                log.error("responder no longer ready (%s): ending %d calls", reason, len(self.calls))
                await asyncio.gather(*(call.end("engine_unavailable", f"the speech engine failed: {reason}")
                                       for call in list(self.calls.values())), return_exceptions=True)
            self.auth.prune()

    async def drain(self, grace_s: float) -> None:
        """Graceful shutdown: refuse new calls, tell every client, let replies in progress finish for up to
        `grace_s`, then close every call with `glm4voice.call.closing` (reason server_shutdown)."""
        self.admission.draining = True
        log.info("shutting down: %d calls, grace %.1f s", len(self.calls), grace_s)
        for call in list(self.calls.values()):
            call.send(P.event("glm4voice.server.shutting_down", grace_s=grace_s))
        deadline = time.monotonic() + grace_s
        while self.calls:
            idle = [c for c in self.calls.values() if not c.replying or time.monotonic() >= deadline]
            await asyncio.gather(*(c.end("server_shutdown", "the server is shutting down") for c in idle),
                                 return_exceptions=True)
            if self.calls:
                await asyncio.sleep(0.1)

    async def shutdown(self, app: web.Application) -> None:
        self.admission.draining = True
        await asyncio.gather(*(call.close("server shutdown") for call in list(self.calls.values())),
                             return_exceptions=True)
        for task in (self._start_task, self._monitor_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.responder.stop()
        await self.lag.stop()

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

    def ice_servers(self, with_turn: bool = True) -> list[dict]:
        w = self.config.webrtc
        servers: list[dict] = []
        if w.stun_urls:
            servers.append({"urls": list(w.stun_urls)})
        if w.turn_urls and with_turn:
            servers.append({"urls": list(w.turn_urls), "username": w.turn_username, "credential": w.turn_credential})
        return servers

    def default_settings(self) -> CallSettings:
        td = self.config.turn_detection
        turns = TurnSettings(threshold=td.threshold, prefix_padding_ms=td.prefix_padding_ms,
                             silence_duration_ms=td.silence_duration_ms, min_speech_ms=td.min_speech_ms,
                             min_interrupt_ms=td.min_interrupt_ms, create_response=td.create_response,
                             interrupt_response=td.interrupt_response)
        return CallSettings(instructions="", sampling=SamplingSettings(), turns=turns)

    # ----- call signalling -------------------------------------------------------------------------

    async def create_call(self, request: web.Request) -> web.Response:
        try:
            return await self._create_call(request)
        except ApiError as exc:
            self.metrics.reject(exc.code)
            raise

    async def _create_call(self, request: web.Request) -> web.Response:
        check_origin(request, self.config)
        self.admission.check_rate(request)
        secret = self.auth.authorize_call(request)
        if request.content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            sdp, session, as_json = await _parse_offer_form(request)
        else:
            body = await self.admission.read_body(request)
            sdp, session, as_json = _parse_offer_body(request.content_type, body)
        self.admission.admit_call(request, len(self.calls), self.ready(), self.not_ready_reason())
        try:
            check_offer(sdp)
        except SdpError as exc:
            raise ApiError(400, exc.code, str(exc)) from None
        settings = self.default_settings()
        for fields in (secret.session if secret is not None else None, session):  # the secret's, then the offer's
            if fields:
                settings = settings.apply(self._session_update(fields))
        sdp, dropped = filter_remote_candidates(sdp, self.config.webrtc.host_addresses)
        if dropped:
            log.debug("dropped %d remote candidates unreachable from %s", dropped, self.config.webrtc.host_addresses)
        answer_sdp, call = await self._answer(sdp, settings)
        self.metrics.calls_total += 1
        location = f"{self.config.http.public_url.rstrip('/')}/v1/realtime/calls/{call.call_id}"
        if as_json:
            return web.json_response({"type": "answer", "sdp": answer_sdp, "call_id": call.call_id}, status=201,
                                     headers={"Location": location})
        return web.Response(status=201, text=answer_sdp, content_type="application/sdp",
                            headers={"Location": location})

    def _session_update(self, session: dict) -> P.SessionUpdate:
        try:
            update = P.parse_client_event(json.dumps({"type": "session.update", "session": session}),
                                          max_event_bytes=self.config.http.max_body_bytes,
                                          max_text_chars=self.config.limits.max_text_chars,
                                          max_instructions_chars=self.config.limits.max_instructions_chars)
        except P.ProtocolError as exc:
            raise ApiError(400, exc.code, f"session: {exc.message}") from None
        assert isinstance(update, P.SessionUpdate)
        return update

    async def create_client_secret(self, request: web.Request) -> web.Response:
        """`POST /v1/realtime/client_secrets` (Realtime API shape): a short-lived key for one browser."""
        check_origin(request, self.config)
        self.admission.check_rate(request)
        self.auth.authorize_mint(request)
        body = await self.admission.read_body(request)
        data: dict = {}
        if body.strip():
            if request.content_type != "application/json":
                raise ApiError(415, "unsupported_media_type", "send the request as application/json")
            try:
                data = json.loads(body)
            except ValueError:
                raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
            if not isinstance(data, dict):
                raise ApiError(400, "invalid_value", "the body must be a JSON object")
        settings = self.default_settings()
        if data.get("session"):  # bad settings are refused now, not when the secret is used
            settings = settings.apply(self._session_update(data["session"]))
        secret = self.auth.mint(data)
        session = P.session_object("", settings.instructions, settings.turn_detection_json(), settings.sampling,
                                   self.responder.info().name)
        session.pop("id")
        return web.json_response({"value": secret.value, "expires_at": int(secret.expires_at), "session": session},
                                 headers={"Cache-Control": "no-store"})

    async def _answer(self, sdp: str, settings: CallSettings) -> tuple[str, Call]:
        w = self.config.webrtc
        ice = [RTCIceServer(urls=list(w.stun_urls))] if w.stun_urls else []
        if w.turn_urls:
            ice.append(RTCIceServer(urls=list(w.turn_urls), username=w.turn_username, credential=w.turn_credential))
        call_id = new_call_id()
        current_call_id.set(call_id)  # this request's context: aiortc's tasks for the call inherit it
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        call = Call(call_id, pc, self.responder, self.vad, self.config, self.metrics, settings, self._forget)
        self.calls[call_id] = call

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio" and not getattr(call, "_inbound_attached", False):
                call._inbound_attached = True  # type: ignore[attr-defined]
                pc.addTrack(call.track)
                call.attach_inbound(track)

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            call.attach_channel(channel)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected":
                call.connected()
            elif pc.connectionState in ("failed", "closed"):
                await call.close(f"peer connection {pc.connectionState} (ice {pc.iceConnectionState})")

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            for transceiver in pc.getTransceivers():
                if transceiver.kind != "audio":
                    transceiver.direction = "inactive"  # we answer audio only; no video decoding
            set_receive_jitter(pc, w.receive_jitter_frames)
            await pc.setLocalDescription(await pc.createAnswer())
        except (ValueError, AssertionError, KeyError, IndexError, TypeError) as exc:
            await call.close("offer rejected")
            raise ApiError(400, "invalid_sdp", f"the SDP offer could not be used: {exc or type(exc).__name__}") from None
        except Exception:
            await call.close("answer failed")
            raise
        return pc.localDescription.sdp, call

    def _forget(self, call: Call) -> None:
        if self.calls.pop(call.call_id, None) is not None:
            self.metrics.outbound_underruns += call.track.stats.underruns

    async def hangup(self, request: web.Request) -> web.Response:
        call_id = request.match_info["call_id"]
        call = self.calls.get(call_id)
        if call is not None:
            current_call_id.set(call_id)  # this request's task only: its log lines name the call
        if call is None:
            raise ApiError(404, "call_not_found", f"no active call {call_id!r}")
        await call.close("hangup")
        return web.json_response({"call_id": call_id, "status": "closed"})

    # ----- pages and status ------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        info = self.responder.info()
        html = self._templates.get_template("index.html").render(
            responder=info.name, demo=info.details.get("weights") == "demo", echo=info.name == "echo",
            ice_gather_timeout_ms=self.config.webrtc.ice_gather_timeout_ms)
        return web.Response(text=html, content_type="text/html")

    async def session(self, request: web.Request) -> web.Response:
        info = self.responder.info()
        # With auth on, TURN credentials are relay capacity: only a caller who may create a call gets
        # them (the page asks again with its Authorization header once it has a client secret).
        turn_allowed = True
        if self.auth.enabled:
            try:
                self.auth.authorize_call(request)
            except ApiError:
                turn_allowed = False
        return web.json_response({
            "ice_servers": self.ice_servers(with_turn=turn_allowed),
            "turn_withheld": bool(self.config.webrtc.turn_urls) and not turn_allowed,
            "ice_gather_timeout_ms": self.config.webrtc.ice_gather_timeout_ms,
            "responder": info.name,
            "demo_weights": info.details.get("weights") == "demo",
            "turn_detection": self.default_settings().turn_detection_json(),
            "calls_endpoint": "/v1/realtime/calls",
            "auth": {"required": self.auth.enabled, "page_secrets": self.auth.enabled and
                     self.config.auth.page_secrets, "client_secrets_endpoint": "/v1/realtime/client_secrets"},
        })

    async def health(self, request: web.Request) -> web.Response:
        info = self.responder.info()
        ready = self.ready()
        body = {
            "ready": ready,
            "responder": {"name": info.name, "ready": info.ready, "output_sample_rate_hz": info.output_sample_rate_hz,
                          **info.details},
            "active_calls": len(self.calls),
            "draining": self.admission.draining,
            "max_calls": self.config.limits.max_calls,
            "uptime_s": round(time.monotonic() - self.started_s, 1),
            "event_loop_lag_ms": {"p50": round(self.lag.quantile_s(0.5) * 1e3, 3),
                                  "p99": round(self.lag.quantile_s(0.99) * 1e3, 3),
                                  "max": round(self.lag.max_s * 1e3, 3)},
        }
        reason = self.not_ready_reason()
        if reason:
            body["error"] = reason
        return web.json_response(body, status=200 if ready and not self.admission.draining else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        text = self.metrics.render(len(self.calls), self.lag)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})


async def _parse_offer_form(request: web.Request) -> tuple[str, dict | None, bool]:
    """The Realtime "unified interface" form: fields `sdp` (the offer) and `session` (JSON). Answers SDP."""
    try:
        form = await request.post()  # bounded by client_max_size = http.max_body_bytes
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SERVER_KEY].config.http.max_body_bytes
        raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_body", f"the multipart form could not be read: {exc}") from None
    sdp = form.get("sdp")
    if not isinstance(sdp, str):
        raise ApiError(400, "missing_required_parameter", "the form needs an 'sdp' field holding the SDP offer")
    session = None
    if isinstance(form.get("session"), str):
        try:
            session = json.loads(form["session"])
        except ValueError:
            raise ApiError(400, "invalid_json", "the form's 'session' field is not valid JSON") from None
        if not isinstance(session, dict):
            raise ApiError(400, "invalid_value", "session must be an object")
    return sdp, session, False


def _parse_offer_body(content_type: str, body: bytes) -> tuple[str, dict | None, bool]:
    """-> (sdp, session or None, answer as JSON). Mix-ups get a message that says what to send."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_body", "the request body is not UTF-8 text") from None
    if content_type == "application/sdp":
        if text.lstrip().startswith("{"):
            raise ApiError(400, "invalid_sdp", "the body looks like JSON but Content-Type is application/sdp: send "
                           "JSON {\"sdp\", \"type\": \"offer\"} as application/json, or the raw SDP as application/sdp")
        return text, None, False
    if content_type == "application/json":
        try:
            data = json.loads(text)
        except ValueError:
            hint = " (it looks like SDP: send it as application/sdp)" if text.lstrip().startswith("v=") else ""
            raise ApiError(400, "invalid_json", f"the body is not valid JSON{hint}") from None
        if not isinstance(data, dict) or not isinstance(data.get("sdp"), str):
            raise ApiError(400, "missing_required_parameter", "JSON offers need {\"sdp\": str, \"type\": \"offer\"}")
        if data.get("type", "offer") != "offer":
            raise ApiError(400, "invalid_value", f"type must be 'offer', got {data.get('type')!r}")
        session = data.get("session")
        if session is not None and not isinstance(session, dict):
            raise ApiError(400, "invalid_value", "session must be an object")
        return data["sdp"], session, True
    raise ApiError(415, "unsupported_media_type", f"Content-Type {content_type or 'none'!r} is not accepted: send the "
                   "SDP offer as application/sdp, or JSON {\"sdp\", \"type\": \"offer\", \"session\"} as "
                   "application/json")


CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Expose-Headers": "Location, Retry-After",
    "Access-Control-Max-Age": "600",
    "Vary": "Origin",
}


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight; cors_middleware adds the headers when the origin is on the allow-list."""
    origin = request.headers.get("Origin", "")
    if not allowed_origin(origin, request.app[SERVER_KEY].config.http.cors_origins):
        raise ApiError(403, "origin_not_allowed", f"pages from {origin or 'no origin'} may not use this server "
                       "(see [http] cors_origins)")
    return web.Response(status=204)


@web.middleware
async def cors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """`Access-Control-Allow-Origin` for origins on `[http] cors_origins` (errors included)."""
    response = await handler(request)
    origin = request.headers.get("Origin")
    if origin and allowed_origin(origin, request.app[SERVER_KEY].config.http.cors_origins):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.update(CORS_HEADERS)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return ApiError(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason,
                        headers={k: v for k, v in exc.headers.items() if k == "Allow"}).response()
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return ApiError(500, "server_error", "internal server error", error_type="server_error").response()


def create_app(config: Config, responder: Responder | None = None) -> web.Application:
    if responder is None:
        from server.responders import make_responder

        responder = make_responder(config.responder.kind, config.model)
    server = Server(config, responder)
    app = web.Application(middlewares=[cors_middleware, error_middleware], client_max_size=config.http.max_body_bytes)
    app[SERVER_KEY] = server
    app.on_startup.append(server.startup)
    app.on_shutdown.append(server.shutdown)
    app.router.add_get("/", server.index)
    app.router.add_get("/session", server.session)
    app.router.add_get("/health", server.health)
    app.router.add_get("/metrics", server.metrics_text)
    app.router.add_post("/v1/realtime/calls", server.create_call)
    app.router.add_post("/v1/realtime/calls/{call_id}/hangup", server.hangup)
    app.router.add_post("/v1/realtime/client_secrets", server.create_client_secret)
    for path in ("/v1/realtime/calls", "/v1/realtime/calls/{call_id}/hangup", "/v1/realtime/client_secrets",
                 "/session"):
        app.router.add_route("OPTIONS", path, preflight)
    app.router.add_static("/static", ROOT / "static", append_version=True)
    return app

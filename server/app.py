"""The server's lifecycle and its routes.

`Server` is the shared context (server/context.py) plus what starts and stops it: the responder's
start, the watch on its health, graceful drain and shutdown. The routes live by concern:
signalling (server/webrtc/signalling.py), client secrets (server/edge/client_secrets.py), the page and status
(server/edge/pages.py); CORS and error shapes in server/edge/errors.py.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from pipeline.responder import Responder
from server.admission import counting_refusals
from server.config import Config
from server.context import ServerContext
from server.edge.client_secrets import ClientSecrets
from server.edge.connections import check_fd_limit
from server.edge.errors import error_middleware, make_cors_middleware, make_preflight
from server.edge.pages import Pages
from server.edge.penalties import PENALTIES_KEY, make_penalty_middleware
from server.realtime import events
from server.webrtc.rtc import set_consent_checks, set_host_addresses
from server.webrtc.signalling import Signalling
from server.websocket.socket import RealtimeSocket

log = logging.getLogger("glm4voice.app")
ROOT = Path(__file__).resolve().parents[1]
HOUSEKEEPING_INTERVAL_S = 1.0  # expired client secrets dropped; responder health read (see _housekeeping)
DRAIN_CLOSE_S = 6.0  # after the grace period, closing the calls may take this long before drain gives up


class Server(ServerContext):
    def __init__(self, config: Config, responder: Responder) -> None:
        super().__init__(config, responder)
        self._was_ready = False  # the responder has been ready once: not-ready now means it failed
        self._failure_pushed = False  # the responder tells us of its own death (no need to read its health)
        self._tasks: list[asyncio.Task] = []

    # ----- lifecycle -------------------------------------------------------------------------------

    async def startup(self, app: web.Application) -> None:
        set_host_addresses(self.config.webrtc.host_addresses)
        set_consent_checks(self.config.webrtc.consent_interval_s, self.config.webrtc.consent_failures)
        self.lag.start()
        check_fd_limit(self.config)
        loop = asyncio.get_running_loop()
        # The hook a responder may offer to push its own death (proposed addition to the contract in
        # pipeline/responder.py): `on_failure(callback)`, callback(reason) called on the loop.
        on_failure = getattr(self.responder, "on_failure", None)
        if callable(on_failure):
            on_failure(self.responder_failed)
            self._failure_pushed = True
        self._tasks = [
            loop.create_task(self._start_responder(), name="responder-start"),
            loop.create_task(self._housekeeping(), name="server-housekeeping"),
        ]

    async def _start_responder(self) -> None:
        try:
            await self.responder.start()
            self._was_ready = True
            log.info("responder %s ready", self.responder.info().name)
        except Exception as exc:
            self.start_error = f"{type(exc).__name__}: {exc}"
            log.exception("responder failed to start")

    async def _housekeeping(self) -> None:
        """Once a second: drop expired client secrets; and, for a responder that cannot push its own
        death, notice that it was ready and is not any more (the engine thread died)."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            self.auth.prune()
            if self._failure_pushed:
                continue
            if self.ready():
                self._was_ready = True
            elif self._was_ready:
                self.responder_failed(self.not_ready_reason() or "the engine stopped")

    def responder_failed(self, reason: str) -> None:
        """The responder can no longer serve: every call ends with the reason (on the loop), and no parked
        conversation can be resumed."""
        if len(self.parked):
            task = asyncio.get_running_loop().create_task(self.parked.close_all(), name="close-parked")
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)
        if not self.calls:
            return
        log.error("responder no longer ready (%s): ending %d calls", reason, len(self.calls))
        for call in list(self.calls.values()):
            task = asyncio.get_running_loop().create_task(
                call.end("engine_unavailable", f"the speech engine failed: {reason}"), name="end-call"
            )
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    async def drain(self, grace_s: float) -> None:
        """Graceful shutdown: refuse new calls, tell every client, let replies in progress finish for up to
        `grace_s`, then close every call with `glm4voice.call.closing` (reason server_shutdown). Returns
        by `grace_s + DRAIN_CLOSE_S` whatever happens; `shutdown()` closes what is left."""
        self.admission.draining = True
        calls = list(self.calls.values())
        log.info("shutting down: %d calls, grace %.1f s", len(calls), grace_s)
        for call in calls:
            call.send(events.event("glm4voice.server.shutting_down", grace_s=grace_s))

        async def finish(call) -> None:
            try:
                await asyncio.wait_for(call.replies.idle.wait(), grace_s)
            except TimeoutError:
                pass
            await call.end("server_shutdown", "the server is shutting down")

        tasks = [asyncio.get_running_loop().create_task(finish(call)) for call in calls]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s + DRAIN_CLOSE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if pending:
            log.warning("drain deadline: %d calls did not close in time", len(pending))

    async def shutdown(self, app: web.Application) -> None:
        self.admission.draining = True
        closes = [asyncio.ensure_future(call.close("server shutdown")) for call in list(self.calls.values())]
        if closes:
            await asyncio.wait(closes, timeout=DRAIN_CLOSE_S)
        for task in [*self._tasks, *closes]:
            task.cancel()
        await asyncio.gather(*self._tasks, *closes, return_exceptions=True)
        for call in list(self.calls.values()):  # a close stuck past the deadline: its slot goes anyway
            self.forget(call)
        await self.parked.close_all()
        await self.responder.stop()
        await self.lag.stop()


SERVER_KEY: web.AppKey[Server] = web.AppKey("server")


def create_app(config: Config, responder: Responder | None = None) -> web.Application:
    if responder is None:
        from server.responders import make_responder

        responder = make_responder(config.responder.kind, config.model, config.vllm, config.transcription)
    server = Server(config, responder)
    signalling, secrets, pages = Signalling(server), ClientSecrets(server), Pages(server)
    app = web.Application(
        middlewares=[
            make_penalty_middleware(server.penalties, config.http),
            make_cors_middleware(config.http),
            error_middleware,
        ],
        client_max_size=config.http.max_body_bytes,
        # aiohttp's keep-alive deadline is armed at connect: a request head must come by then
        handler_args={"keepalive_timeout": config.http.header_timeout_s},
    )
    app[SERVER_KEY] = server
    app[PENALTIES_KEY] = server.penalties  # the connection caps refuse blocked addresses at accept
    app.on_startup.append(server.startup)
    app.on_shutdown.append(server.shutdown)
    app.router.add_get("/", pages.index)
    app.router.add_get("/session", pages.session)
    app.router.add_get("/health", pages.health)
    app.router.add_get("/metrics", pages.metrics)
    # the doors a call comes in by: the WebSocket transport (and control connections), WebRTC
    app.router.add_get("/v1/realtime", counting_refusals(server, RealtimeSocket(server).handle))
    app.router.add_post("/v1/realtime/calls", counting_refusals(server, signalling.create_call))
    app.router.add_post("/v1/realtime/calls/{call_id}/hangup", signalling.hangup)
    app.router.add_post("/v1/realtime/client_secrets", secrets.mint)
    preflight = make_preflight(config.http)
    for path in (
        "/v1/realtime/calls",
        "/v1/realtime/calls/{call_id}/hangup",
        "/v1/realtime/client_secrets",
        "/session",
    ):
        app.router.add_route("OPTIONS", path, preflight)
    app.router.add_static("/static", ROOT / "static", append_version=True)
    return app

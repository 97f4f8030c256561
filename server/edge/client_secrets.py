"""`POST /v1/realtime/client_secrets` (Realtime API shape): a short-lived key for one browser, carrying
the session settings of the calls made with it. The secrets themselves live in `server/edge/auth.py`."""

from __future__ import annotations

from aiohttp import web

from server.context import ServerContext
from server.edge.limits import ApiError, check_origin, loads_json, parse_session
from server.realtime import events, session_update


class ClientSecrets:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def mint(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        check_origin(request, ctx.config)
        ctx.admission.check_rate(request)
        ctx.auth.authorize_mint(request)
        body = await ctx.admission.read_body(request)
        data: object = {}
        if body.strip():
            if request.content_type != "application/json":
                raise ApiError(415, "unsupported_media_type", "send the request as application/json")
            data = loads_json(body, "the body")
            if not isinstance(data, dict):
                raise ApiError(400, "invalid_value", "the body must be a JSON object")
        assert isinstance(data, dict)
        settings = ctx.default_settings()
        if data.get("session"):  # bad settings are refused now, not when the secret is used
            if not isinstance(data["session"], dict):
                raise ApiError(400, "invalid_value", "session must be an object")
            settings = settings.apply(parse_session(data["session"], ctx.config))
        if isinstance(data.get("session"), dict):  # the secret keeps what its calls will read, no more
            data = {**data, "session": session_update.used_session_fields(data["session"])}
        secret = ctx.auth.mint(data)
        session = events.session_object(
            "",
            settings.instructions,
            settings.turn_detection_json(),
            settings.sampling,
            ctx.responder.info().name,
            transcription=settings.transcription,
        )
        session.pop("id")
        return web.json_response(
            {"value": secret.value, "expires_at": int(secret.expires_at), "session": session},
            headers={"Cache-Control": "no-store"},
        )

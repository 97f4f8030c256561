"""One admission path for every door a call comes in by.

A door (`POST /v1/realtime/calls`: WebRTC, server/webrtc/signalling.py; `GET /v1/realtime`: WebSocket,
server/websocket/socket.py) reads its request its own way and goes through the same steps, in this
order: `check_door` (origin, per-address rate, auth), then `admit`, then `open_call` (the `Call` on
the door's transport, registered, counted). `admit` checks everything before it changes anything, so
a refused request - a resume included - leaves every live and parked call as it was: the resume
token's form; the live-call limit (parked calls do not count: they yield, and a live call holding the
token hands its slot over); the door's own check (a WebRTC offer's SDP, and for a resume whether
aiortc can answer it); the session fields of the client secret and of the request. Only then: a live
call holding the token parks, the parked conversation is taken back, and if live and parked calls
hold every KV slot the oldest other parked call is closed. `counting_refusals` wraps a door's handler
so that every refusal is counted by its code (/metrics).

Both doors take `?glm4voice_events=on` (`extension_events`): only a client that asks gets our
`glm4voice.*` events, so that an unmodified OpenAI Realtime client sees OpenAI's event types only
(docs/protocol.md "Extension events").
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from server.call.call import Call
from server.call.resume import ParkedCall
from server.call.settings import CallSettings
from server.call.transport import Transport
from server.context import ServerContext
from server.edge.auth import ClientSecret
from server.edge.limits import ApiError, check_origin, client_address, parse_session
from server.logs import current_call_id

MAX_RESUME_TOKEN_CHARS = 256  # ours are 36; anything much longer is not one
EVENTS_PARAM = "glm4voice_events"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Admitted:
    settings: CallSettings
    resumed: ParkedCall | str | None  # the conversation taken back, or why it could not be (RESUME_FAILED)
    address: str = ""  # the client's, as the limits count it
    extension_events: bool = False  # the client asked for our `glm4voice.*` events


def counting_refusals(ctx: ServerContext, handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def counted(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            ctx.metrics.reject(exc.code)
            raise

    return counted


def extension_events(request: web.Request, default: bool) -> bool:
    """`?glm4voice_events=on|off`: whether our `glm4voice.*` events reach this connection. Off by default
    for a call (some OpenAI clients fail on an event type they do not know: the Agents SDK emits an
    `error` for each), on for a control connection (our own tool)."""
    value = request.query.get(EVENTS_PARAM)
    if value is None:
        return default
    if value not in ("on", "off"):
        raise ApiError(400, "invalid_value", f"{EVENTS_PARAM} must be 'on' or 'off', got {value!r}")
    return value == "on"


def check_door(ctx: ServerContext, request: web.Request) -> ClientSecret | None:
    """Origin, rate and auth: before the door reads more of the request. Returns the client secret used."""
    check_origin(request, ctx.config)
    ctx.admission.check_rate(request)
    return ctx.auth.authorize_call(request)


async def admit(
    ctx: ServerContext,
    request: web.Request,
    secret: ClientSecret | None,
    session: dict | None = None,
    resume_token: str | None = None,
    check: Callable[[], Awaitable[None]] | None = None,
) -> Admitted:
    """May a call start now, and with what: raises `ApiError` if not, having changed nothing.
    `session`: the request's own session fields; `check`: the door's own check of its request."""
    events_on = extension_events(request, default=False)
    if resume_token is not None and not (
        resume_token.isascii() and len(resume_token) <= MAX_RESUME_TOKEN_CHARS
    ):
        raise ApiError(400, "invalid_value", "resume_token must be the string session.created gave")
    superseded = ctx.call_holding(resume_token) if resume_token is not None else None
    live = len(ctx.calls) - (superseded is not None)  # a live call holding the token hands its slot over
    ctx.admission.admit_call(request, live, ctx.ready(), ctx.not_ready_reason())
    if check is not None:
        await check()
    updates = [  # the secret's, then the request's: read now, so that bad fields change nothing
        parse_session(fields, ctx.config)
        for fields in (secret.session if secret is not None else None, session)
        if fields
    ]
    if superseded is not None:  # the client noticed the drop before we did: that call parks now
        await superseded.close("the client reconnected (resume)", network_lost=True)
    resumed: ParkedCall | str | None = None
    if resume_token is not None:
        resumed = ctx.parked.take(resume_token) if ctx.parked.window_s > 0 else "disabled"
    while ctx.occupied_slots() >= ctx.config.limits.max_calls and await ctx.parked.make_room(resume_token):
        pass  # parked calls yield their KV slots to live ones
    settings = resumed.settings if isinstance(resumed, ParkedCall) else ctx.default_settings()
    for update in updates:
        settings = settings.apply(update)
    http = ctx.config.http
    address = client_address(request, http.trust_forwarded_for, http.trusted_proxy_hops)
    return Admitted(settings, resumed, address, events_on)


def open_call(ctx: ServerContext, call_id: str, transport: Transport, admitted: Admitted) -> Call:
    """The admitted call on its transport, in the registry (hangup, control connections, drain find it)."""
    current_call_id.set(call_id)  # this request's context: the tasks started for the call inherit it
    call = Call(
        call_id,
        transport,
        ctx.responder,
        ctx.vad,
        ctx.config,
        ctx.metrics,
        admitted.settings,
        ctx.forget,
        parking=ctx.parked if ctx.parked.window_s > 0 else None,
        resumed=admitted.resumed,
        address=admitted.address,
    )
    call.extension_events = admitted.extension_events
    ctx.calls[call_id] = call
    ctx.metrics.calls.inc()
    return call

"""Call signalling: read an offer (SDP, JSON or the Realtime form), check it, answer it, hang up.

One `offer` handler in the spirit of aiortc's example server: the peer connection's events are wired
to the call in closures. Every refusal is an `ApiError`; an offer aiortc cannot answer is the client's
fault (`400 invalid_sdp`), and whatever fails, the half-built call is closed and leaves the registry.
The offer's `?glm4voice_events=on` is read by the admission path every door shares (server/admission.py).
"""

from __future__ import annotations

import functools
import logging

from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from server.admission import Admitted, admit, check_door, open_call
from server.call.call import Call, new_call_id
from server.call.resume import RESUME_HEADER
from server.config import Config
from server.context import ServerContext
from server.edge.limits import ApiError, loads_json, read_form
from server.logs import current_call_id
from server.webrtc.rtc import (
    MAX_CANDIDATES_PER_ADDRESS,
    SdpError,
    check_offer,
    filter_remote_candidates,
    set_receive_jitter,
)
from server.webrtc.transport import WebRtcTransport

log = logging.getLogger("glm4voice.signalling")


async def _check_offer(sdp: str, resuming: bool) -> None:
    """Our checks of the offer; for a resume also aiortc's own reading of it, on a peer connection thrown
    away, so that an offer aiortc refuses is refused before the resume takes the parked conversation."""
    try:
        check_offer(sdp)
    except SdpError as exc:
        raise ApiError(400, exc.code, str(exc)) from None
    if not resuming:
        return
    pc = RTCPeerConnection()
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as exc:  # aiortc refuses an offer with whatever it raises: the offer is at fault
        raise ApiError(
            400, "invalid_sdp", f"the SDP offer could not be answered: {exc or type(exc).__name__}"
        ) from None
    finally:
        await pc.close()


class Signalling:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def create_call(self, request: web.Request) -> web.Response:
        ctx, config = self.ctx, self.ctx.config
        secret = check_door(ctx, request)
        if request.content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            sdp, session, as_json, resume_token = await _parse_offer_form(request, config)
        else:
            body = await ctx.admission.read_body(request)
            sdp, session, as_json, resume_token = _parse_offer_body(request.content_type, body)
        resume_token = resume_token or request.headers.get(RESUME_HEADER) or None
        admitted = await admit(
            ctx,
            request,
            secret,
            session,
            resume_token,
            check=functools.partial(_check_offer, sdp, resume_token is not None),
        )
        sdp, dropped = filter_remote_candidates(
            sdp, config.webrtc.host_addresses, config.webrtc.max_remote_candidates, MAX_CANDIDATES_PER_ADDRESS
        )
        if dropped:
            log.debug(
                "dropped %d remote candidates (unreachable from %s, or over the caps of %d per offer "
                "and %d per address)",
                dropped,
                config.webrtc.host_addresses,
                config.webrtc.max_remote_candidates,
                MAX_CANDIDATES_PER_ADDRESS,
            )
        answer_sdp, call = await self._answer(sdp, admitted)
        location = f"{config.http.public_url.rstrip('/')}/v1/realtime/calls/{call.call_id}"
        if as_json:
            return web.json_response(
                {"type": "answer", "sdp": answer_sdp, "call_id": call.call_id},
                status=201,
                headers={"Location": location},
            )
        return web.Response(
            status=201, text=answer_sdp, content_type="application/sdp", headers={"Location": location}
        )

    async def _answer(self, sdp: str, admitted: Admitted) -> tuple[str, Call]:
        ctx, w = self.ctx, self.ctx.config.webrtc
        ice = [RTCIceServer(urls=list(w.stun_urls))] if w.stun_urls else []
        if w.turn_urls:
            ice.append(
                RTCIceServer(urls=list(w.turn_urls), username=w.turn_username, credential=w.turn_credential)
            )
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        transport = WebRtcTransport(pc)
        call = open_call(ctx, new_call_id(), transport, admitted)

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio":
                transport.attach_inbound(track, call)

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            transport.attach_channel(channel, call)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected":
                call.connected()
            elif pc.connectionState in ("failed", "closed"):  # closed by the peer, or by our own close()
                await call.close(
                    f"peer connection {pc.connectionState} (ice {pc.iceConnectionState})", network_lost=True
                )

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            for transceiver in pc.getTransceivers():
                if transceiver.kind != "audio":
                    transceiver.direction = "inactive"  # we answer audio only; no video decoding
            # Our voice goes on the first audio section whatever the client sends us: a `recvonly`
            # client (typed turns, spoken replies) gets no "track" event but still hears the replies.
            pc.addTrack(transport.audio)
            transport.opus_policed = set_receive_jitter(pc, w.receive_jitter_frames, call.audio_arrived)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc refuses an offer with whatever it raises: the offer is at fault
            log.info("offer rejected: %s", repr(exc))
            await call.close("offer rejected")
            raise ApiError(
                400, "invalid_sdp", f"the SDP offer could not be answered: {exc or type(exc).__name__}"
            ) from None
        return pc.localDescription.sdp, call

    async def hangup(self, request: web.Request) -> web.Response:
        call_id = request.match_info["call_id"]
        call = self.ctx.calls.get(call_id)
        if call is None and self.ctx.parked.discard_call(call_id):
            return web.json_response({"call_id": call_id, "status": "closed"})
        if call is None:
            raise ApiError(404, "call_not_found", f"no active call {call_id!r}")
        current_call_id.set(call_id)  # this request's task only: its log lines name the call
        await call.close("hangup")
        return web.json_response({"call_id": call_id, "status": "closed"})


async def _parse_offer_form(
    request: web.Request, config: Config
) -> tuple[str, dict | None, bool, str | None]:
    """The Realtime "unified interface" form: fields `sdp` (the offer), `session` (JSON) and our
    `resume_token`. Answers SDP."""
    form = await read_form(request, config.http.max_body_bytes, config.http.body_timeout_s)
    sdp = form.get("sdp")
    if not isinstance(sdp, str):
        raise ApiError(
            400, "missing_required_parameter", "the form needs an 'sdp' field holding the SDP offer"
        )
    session = None
    if isinstance(form.get("session"), str):
        session = loads_json(form["session"], "the form's 'session' field")
        if not isinstance(session, dict):
            raise ApiError(400, "invalid_value", "session must be an object")
    token = form.get("resume_token")
    return sdp, session, False, token if isinstance(token, str) and token else None


def _parse_offer_body(content_type: str, body: bytes) -> tuple[str, dict | None, bool, str | None]:
    """-> (sdp, session or None, answer as JSON, resume token or None). Mix-ups get a message that says
    what to send."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_body", "the request body is not UTF-8 text") from None
    if content_type == "application/sdp":
        if text.lstrip().startswith("{"):
            raise ApiError(
                400,
                "invalid_sdp",
                "the body looks like JSON but Content-Type is application/sdp: send "
                'JSON {"sdp", "type": "offer"} as application/json, or the raw SDP as application/sdp',
            )
        return text, None, False, None
    if content_type == "application/json":
        hint = " (it looks like SDP: send it as application/sdp)" if text.lstrip().startswith("v=") else ""
        data = loads_json(text, "the body", hint)
        if not isinstance(data, dict) or not isinstance(data.get("sdp"), str):
            raise ApiError(
                400, "missing_required_parameter", 'JSON offers need {"sdp": str, "type": "offer"}'
            )
        if data.get("type", "offer") != "offer":
            raise ApiError(400, "invalid_value", f"type must be 'offer', got {data.get('type')!r}")
        session = data.get("session")
        if session is not None and not isinstance(session, dict):
            raise ApiError(400, "invalid_value", "session must be an object")
        token = data.get("resume_token")
        if token is not None and not isinstance(token, str):
            raise ApiError(400, "invalid_value", "resume_token must be the string session.created gave")
        return data["sdp"], session, True, token or None
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {content_type or 'none'!r} is not accepted: send the "
        'SDP offer as application/sdp, or JSON {"sdp", "type": "offer", "session"} as '
        "application/json",
    )

"""HTTP signalling with the server (docs/protocol.md): GET /session, POST the offer, hang up.

Every failure becomes one of client.errors' exceptions, so the caller only decides whether to retry."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiortc import RTCConfiguration, RTCIceServer

from client.errors import AuthError, NetworkError, ServerRefused

HTTP_TIMEOUT_S = 10.0  # one request; the reconnect loop decides how long to keep trying
# The client reads our `glm4voice.*` events (turn latency, cancelled replies, why a call closes, resume):
# the server sends them only to a client that asks (docs/protocol.md "Extension events").
EVENTS_QUERY = {"glm4voice_events": "on"}


@dataclass(frozen=True)
class Answer:
    sdp: str
    call_id: str
    location: str  # /v1/realtime/calls/{call_id}, for the hangup


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _refusal(response: aiohttp.ClientResponse) -> Exception:
    """The server's one JSON error shape -> AuthError or ServerRefused with its code and message."""
    try:
        error = (await response.json(content_type=None))["error"]
        code, message = str(error.get("code", "")), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        code, message = "", (await response.text())[:200]
    retry = response.headers.get("Retry-After")
    line = f"HTTP {response.status} {code}: {message}".strip()
    if response.status in (401, 403):
        return AuthError(f"not authorized: {line}")
    return ServerRefused(
        f"server refused the call: {line}",
        response.status,
        code,
        float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
    )


async def fetch_session(http: aiohttp.ClientSession, base_url: str, token: str | None) -> dict:
    """The server's /session: ICE (TURN) servers, the calls endpoint, whether auth is required."""
    try:
        async with http.get(f"{base_url}/session", headers=_headers(token)) as r:
            if r.status != 200:
                raise await _refusal(r)
            return await r.json()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise NetworkError(f"cannot reach {base_url}: {exc or type(exc).__name__}") from None


def rtc_configuration(session: dict) -> RTCConfiguration:
    """/session's ice_servers (RTCIceServer dicts, TURN credentials included when authorised) for aiortc."""
    servers = [
        RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
        for s in session.get("ice_servers") or []
    ]
    return RTCConfiguration(iceServers=servers or None)


async def post_offer(
    http: aiohttp.ClientSession,
    base_url: str,
    endpoint: str,
    sdp: str,
    session: dict,
    token: str | None,
    resume_token: str | None = None,
) -> Answer:
    """POST the offer as JSON with the call's starting session (applied before session.created)."""
    body: dict = {"type": "offer", "sdp": sdp, "session": session}
    if resume_token:  # docs/client.md (resume): a server that keeps dropped calls continues this conversation
        body["resume_token"] = resume_token
    try:
        async with http.post(
            f"{base_url}{endpoint}", json=body, headers=_headers(token), params=EVENTS_QUERY
        ) as r:
            if r.status != 201:
                raise await _refusal(r)
            data = await r.json()
            location = r.headers.get("Location", f"{endpoint}/{data.get('call_id', '')}")
            return Answer(
                sdp=data["sdp"], call_id=data.get("call_id") or location.rsplit("/", 1)[-1], location=location
            )
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise NetworkError(f"cannot reach {base_url}: {exc or type(exc).__name__}") from None


async def hangup(http: aiohttp.ClientSession, base_url: str, location: str) -> None:
    """Free the call on the server now (best effort: a server that is gone has nothing to free)."""
    try:
        async with http.post(f"{base_url}{location}/hangup") as r:
            await r.read()
    except (aiohttp.ClientError, TimeoutError, OSError):
        pass


def http_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))

"""Who may call: API key, client secrets (Realtime shape), CORS allow-list, per-address rate limit,
shutdown draining - every refusal with its documented status, code and headers."""

from __future__ import annotations

import dataclasses
import json
import time

import aiohttp
import pytest

from tests.helpers.rtc_client import RealtimeClient, make_offer, start_server

API_KEY = "test-key-0123456789abcdef"


async def _request(
    base: str, path: str, *, method: str = "POST", data=None, headers: dict | None = None, json_body=None
):
    async with aiohttp.ClientSession() as http:
        async with http.request(method, base + path, data=data, json=json_body, headers=headers or {}) as r:
            text = await r.text()
            body = json.loads(text) if r.content_type == "application/json" else text
            return r.status, body, r.headers


def _bearer(token: str, **more: str) -> dict:
    return {"Authorization": f"Bearer {token}", **more}


@pytest.fixture
async def auth_server():
    running = await start_server(
        overrides={"auth": {"api_key": API_KEY}, "http": {"cors_origins": ["https://app.example.com"]}}
    )
    yield running
    await running.runner.cleanup()


async def test_api_key_and_client_secrets(auth_server):
    base = auth_server.base_url
    sdp = await make_offer()
    sdp_type = {"Content-Type": "application/sdp"}
    cases = [  # (name, headers) -> 401 code
        ("no key", sdp_type, "missing_api_key"),
        ("wrong key", _bearer("wrong-key-wrong-key-wrong", **sdp_type), "invalid_api_key"),
        ("basic scheme", {"Authorization": f"Basic {API_KEY}", **sdp_type}, "missing_api_key"),
        ("unknown secret", _bearer("ek_not-a-real-secret", **sdp_type), "invalid_client_secret"),
    ]
    for name, headers, code in cases:
        status, body, got = await _request(base, "/v1/realtime/calls", data=sdp, headers=headers)
        assert (status, body["error"]["code"]) == (401, code), (name, body)
        assert got["WWW-Authenticate"].startswith("Bearer"), name
    # Minting needs the key itself (not a secret, not nothing).
    status, body, _ = await _request(base, "/v1/realtime/client_secrets", json_body={})
    assert (status, body["error"]["code"]) == (401, "missing_api_key")
    status, body, _ = await _request(
        base,
        "/v1/realtime/client_secrets",
        json_body={"expires_after": {"anchor": "created_at", "seconds": 5}},
        headers=_bearer(API_KEY),
    )
    assert (status, body["error"]["code"]) == (400, "invalid_value")
    t0 = time.time()
    status, minted, headers = await _request(
        base,
        "/v1/realtime/client_secrets",
        headers=_bearer(API_KEY),
        json_body={
            "expires_after": {"anchor": "created_at", "seconds": 60},
            "session": {"instructions": "Answer in French."},
        },
    )
    assert status == 200, minted
    assert minted["value"].startswith("ek_") and headers["Cache-Control"] == "no-store"
    assert t0 + 59 <= minted["expires_at"] <= time.time() + 61
    assert minted["session"]["instructions"] == "Answer in French."
    status, body, _ = await _request(
        base, "/v1/realtime/client_secrets", headers=_bearer(minted["value"]), json_body={}
    )
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    # The secret opens a call, which starts with the secret's session settings; the key opens one too.
    for token, instructions in ((minted["value"], "Answer in French."), (API_KEY, "")):
        client = RealtimeClient(base)
        client.headers = _bearer(token)
        await client.connect()
        created = await client.wait_for("session.created", 5)
        assert created["session"]["instructions"] == instructions
        assert await client.hangup() == 200
    # An expired secret is refused (its expiry moved into the past rather than waiting 10 s).
    secrets = auth_server.server.auth._secrets
    secrets[minted["value"]] = dataclasses.replace(secrets[minted["value"]], expires_at=time.time() - 1)
    status, body, _ = await _request(
        base, "/v1/realtime/calls", data=sdp, headers=_bearer(minted["value"], **sdp_type)
    )
    assert (status, body["error"]["code"]) == (401, "expired_client_secret")
    assert auth_server.server.calls == {}
    # /session tells the page that auth is on and that it cannot mint for itself.
    status, session, _ = await _request(base, "/session", method="GET")
    assert session["auth"] == {
        "required": True,
        "page_secrets": False,
        "client_secrets_endpoint": "/v1/realtime/client_secrets",
    }


async def test_page_secrets_only_for_same_origin_pages():
    running = await start_server(overrides={"auth": {"api_key": API_KEY, "page_secrets": True}})
    try:
        base = running.base_url
        host = base.split("//", 1)[1]
        status, minted, _ = await _request(
            base, "/v1/realtime/client_secrets", json_body={}, headers={"Origin": f"http://{host}"}
        )
        assert status == 200 and minted["value"].startswith("ek_")
        status, minted, _ = await _request(
            base, "/v1/realtime/client_secrets", json_body={}, headers={"Sec-Fetch-Site": "same-origin"}
        )
        assert status == 200
        status, body, _ = await _request(base, "/v1/realtime/client_secrets", json_body={})
        assert (status, body["error"]["code"]) == (401, "missing_api_key")  # no browser origin: no secret
        status, body, _ = await _request(
            base,
            "/v1/realtime/client_secrets",
            json_body={},
            headers={"Origin": "https://evil.example.net", "Sec-Fetch-Site": "cross-site"},
        )
        assert (status, body["error"]["code"]) == (403, "origin_not_allowed")
    finally:
        await running.runner.cleanup()


async def test_cors_allow_list(auth_server):
    base = auth_server.base_url
    allowed, other = "https://app.example.com", "https://evil.example.net"
    status, _, headers = await _request(
        base,
        "/v1/realtime/calls",
        method="OPTIONS",
        headers={
            "Origin": allowed,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert status == 204 and headers["Access-Control-Allow-Origin"] == allowed
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert "Location" in headers["Access-Control-Expose-Headers"]
    status, body, headers = await _request(
        base,
        "/v1/realtime/calls",
        method="OPTIONS",
        headers={"Origin": other, "Access-Control-Request-Method": "POST"},
    )
    assert (status, body["error"]["code"]) == (403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in headers
    # A foreign page's "simple" multipart POST (no preflight) is refused before anything is created.
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("sdp", await make_offer())
    status, body, _ = await _request(
        base, "/v1/realtime/calls", data=form, headers=_bearer(API_KEY, Origin=other)
    )
    assert (status, body["error"]["code"]) == (403, "origin_not_allowed")
    # An allowed origin gets its answer with CORS headers, errors included.
    status, body, headers = await _request(
        base,
        "/v1/realtime/calls",
        data="v=0\r\n",
        headers=_bearer(API_KEY, Origin=allowed, **{"Content-Type": "application/sdp"}),
    )
    assert status == 400 and headers["Access-Control-Allow-Origin"] == allowed
    assert auth_server.server.calls == {}


async def test_rate_limit_per_address_and_draining():
    running = await start_server(
        overrides={
            "limits": {"calls_per_minute_per_address": 6, "call_burst_per_address": 3, "retry_after_s": 3}
        }
    )
    try:
        base = running.base_url
        garbage = {"Content-Type": "application/sdp"}
        for _ in range(3):  # the burst: each one reaches the offer check
            status, body, _ = await _request(base, "/v1/realtime/calls", data="nonsense", headers=garbage)
            assert (status, body["error"]["code"]) == (400, "invalid_sdp")
        status, body, headers = await _request(base, "/v1/realtime/calls", data="nonsense", headers=garbage)
        assert (status, body["error"]["code"]) == (429, "rate_limited")
        assert 1 <= int(headers["Retry-After"]) <= 10  # one token per 10 s
        # Another address has its own bucket (behind a trusted proxy the address is X-Forwarded-For's).
        running.server.admission.config = dataclasses.replace(
            running.server.config,
            http=dataclasses.replace(running.server.config.http, trust_forwarded_for=True),
        )
        status, body, _ = await _request(
            base, "/v1/realtime/calls", data="nonsense", headers={**garbage, "X-Forwarded-For": "203.0.113.9"}
        )
        assert status == 400
        # Draining for shutdown: new calls get 503 shutting_down, /health says not ready.
        running.server.admission.rate.rate_per_s = 0  # (rate limit off for the rest)
        running.server.admission.draining = True
        status, body, headers = await _request(
            base, "/v1/realtime/calls", data=await make_offer(), headers=garbage
        )
        assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "shutting_down", "3")
        status, health, _ = await _request(base, "/health", method="GET")
        assert status == 503 and health["draining"] is True
    finally:
        await running.runner.cleanup()


async def test_turn_credentials_only_for_authorised_callers():
    turn = {
        "turn_urls": ["turn:turn.example.com:3478"],
        "turn_username": "u",
        "turn_credential": "relay-secret",
    }
    running = await start_server(overrides={"auth": {"api_key": API_KEY}, "webrtc": turn})
    try:
        base = running.base_url
        status, anonymous, _ = await _request(base, "/session", method="GET")
        assert status == 200 and anonymous["turn_withheld"] is True
        assert "relay-secret" not in json.dumps(anonymous)
        status, secret, _ = await _request(
            base, "/v1/realtime/client_secrets", json_body={}, headers=_bearer(API_KEY)
        )
        assert status == 200
        status, authorised, _ = await _request(
            base, "/session", method="GET", headers=_bearer(secret["value"])
        )
        assert status == 200 and authorised["turn_withheld"] is False
        assert any(s.get("credential") == "relay-secret" for s in authorised["ice_servers"])
    finally:
        await running.runner.cleanup()
    open_server = await start_server(overrides={"webrtc": turn})  # no auth: the page gets TURN as before
    try:
        status, body, _ = await _request(open_server.base_url, "/session", method="GET")
        assert status == 200 and body["turn_withheld"] is False
        assert any(s.get("credential") == "relay-secret" for s in body["ice_servers"])
    finally:
        await open_server.runner.cleanup()

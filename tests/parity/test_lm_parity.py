"""LM parity against the official ChatGLM outputs in the fixture dir (sizes and cases read from its files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.lm.model import VoiceLM
from tests.helpers.parity import stage_dir

LM_DIR = stage_dir("lm", "cases.json")
TOLERANCE = 1e-4  # float32; the official eager/sdpa and 1/2-thread spread is ~2e-6 (parity README)


def _cases() -> list[dict]:
    if not (LM_DIR / "cases.json").is_file():
        return []
    return json.loads((LM_DIR / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def lm() -> VoiceLM:
    torch.set_num_threads(2)
    return VoiceLM.from_pretrained(LM_DIR, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_full_logits_match_official(lm: VoiceLM, case: dict) -> None:
    ref = np.load(LM_DIR / f"{case['name']}_logits.npy")
    ours = lm.logits(case["input_ids"]).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < TOLERANCE


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_cached_prefill_logits_match_official(lm: VoiceLM, case: dict) -> None:
    """Our own attention over the KV pool at every prompt position (prefill one token at a time)."""
    ref = np.load(LM_DIR / f"{case['name']}_logits.npy")
    cache = lm.new_cache()
    rows = [lm.prefill(cache, [t]).numpy() for t in case["input_ids"]]
    assert np.abs(np.stack(rows) - ref).max() < TOLERANCE


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_greedy_continuation_through_cached_decode(lm: VoiceLM, case: dict) -> None:
    expected = case["greedy_new_tokens"]
    assert lm.generate(case["input_ids"], max_new_tokens=len(expected), temperature=0.0) == expected
    # The logits of every step (prefill, then one decode step per fed token) match the official ones.
    ref = np.load(LM_DIR / f"{case['name']}_greedy_step_logits.npy")
    cache = lm.new_cache()
    steps = [lm.prefill(cache, case["input_ids"])]
    for token in expected[:-1]:
        steps.append(lm.decode_step([cache], [token])[0])
    assert np.abs(torch.stack(steps).numpy() - ref).max() < TOLERANCE

"""Batched sampling (pipeline/lm/sampling.py): per-row settings in one call, the warpers' semantics."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.lm.sampling import RowSampling, sample_logits, sample_rows


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _settings(seed: int) -> list[RowSampling]:
    return [
        RowSampling(0.0),  # greedy
        RowSampling(0.9, top_k=5, generator=_seeded(seed)),
        RowSampling(0.7, top_p=0.6, generator=_seeded(seed + 1)),  # top_k 0: the full-sort path
        RowSampling(1.3, top_p=0.9, top_k=40, generator=_seeded(seed + 2)),
        RowSampling(1.0, generator=_seeded(seed + 3)),  # temperature only
    ]


def test_a_batch_equals_each_row_alone() -> None:
    logits = torch.randn(5, 1000, generator=_seeded(0))
    for step_seed in range(5):  # several draws: the generators advance the same way batched and alone
        batched = sample_rows(logits, _settings(10 * step_seed)).tolist()
        alone = [
            sample_rows(logits[i : i + 1], [row]).item() for i, row in enumerate(_settings(10 * step_seed))
        ]
        assert batched == alone
    assert batched[0] == int(logits[0].argmax())


def test_generators_advance_per_row_and_repeat_per_seed() -> None:
    logits = torch.randn(1, 1000, generator=_seeded(1)).expand(2, -1)
    rows = [RowSampling(1.0, generator=_seeded(4)), RowSampling(1.0, generator=_seeded(4))]
    draws = [sample_rows(logits, rows).tolist() for _ in range(30)]
    assert all(a == b for a, b in draws)  # same seed, same stream, whatever the row
    assert len({a for a, _ in draws}) > 1  # it really samples


def test_top_k_1_and_a_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(6, 500, generator=_seeded(2))
    best = logits.argmax(-1)
    assert torch.equal(
        sample_rows(logits, [RowSampling(1.5, top_k=1, generator=_seeded(i)) for i in range(6)]), best
    )
    assert torch.equal(
        sample_rows(logits, [RowSampling(1.5, top_p=1e-6, generator=_seeded(i)) for i in range(6)]), best
    )
    assert torch.equal(sample_logits(logits, 0.0), best)


def _expected_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' warpers in order: temperature, top-k, top-p (the best id always kept)."""
    z = logits / temperature
    order = np.argsort(-z)
    keep = np.zeros(z.size, bool)
    keep[order[: top_k or z.size]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    sorted_p = p[order]
    mass_before = np.cumsum(sorted_p) - sorted_p
    drop = order[mass_before >= top_p]
    p[drop] = 0.0
    return p / p.sum()


def test_distribution_matches_the_warpers() -> None:
    """Chi-square goodness of fit on a tiny vocabulary, per setting (fixed seeds: deterministic)."""
    logits = np.array([2.0, 1.5, 1.0, 0.7, 0.2, -0.5, -1.0, -3.0], dtype=np.float32)
    n = 6000
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.8, 5, 1.0), (1.2, 0, 0.8), (1.5, 6, 0.9)]:
        want = _expected_probs(logits.astype(np.float64), temperature, top_k, top_p)
        row = RowSampling(temperature, top_p, top_k, _seeded(7))
        draws = sample_rows(torch.from_numpy(logits)[None].expand(n, -1), [row] * n).numpy()  # (n,)
        counts = np.bincount(draws, minlength=logits.size)
        assert counts[want == 0].sum() == 0  # filtered ids never come
        kept = want > 0
        expected = n * want[kept]
        chi2 = float((((counts[kept] - expected) ** 2) / expected).sum())
        # 99.9th percentile of chi-square with (kept - 1) <= 7 degrees of freedom is 24.3
        assert chi2 < 24.3, (temperature, top_k, top_p, chi2, counts, expected)

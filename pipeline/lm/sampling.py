"""Next-token choice from logits: temperature -> top-k -> top-p, as transformers' warpers (docs/lm.md).

`sample_rows` picks one id for every row of a batched decode step in one call: each row has its own
temperature / top_p / top_k / generator, the filtering and the argmax run on the whole batch, and the
caller brings the ids to the host with one `.tolist()`. Sampling draws exponential noise
(argmax(p / q), q ~ Exp(1)), which is a draw from p without a multinomial's host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowSampling:
    """One row's settings. temperature 0 = greedy; top_k 0 and top_p 1 disable their filter."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None  # on the logits' device; None = torch's default generator

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def candidates(self, vocab_size: int) -> int:
        """How many best-ranked ids this row chooses among (its noise is drawn for exactly these)."""
        if self.greedy:
            return 1
        return min(self.top_k, vocab_size) if self.top_k > 0 else vocab_size


def _column(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A (B, 1) device tensor from host values; on CUDA through pinned memory, so the copy does not wait."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)[:, None]
    return host.to(device)[:, None]


def sample_rows(logits: Tensor, rows: Sequence[RowSampling]) -> Tensor:
    """Next ids (B,) on the logits' device from logits (B, V), one `RowSampling` per row.

    The candidates are the `top_k` best ids of each row (`torch.topk` over the widest row's k): the
    whole vocabulary (168 960 ids at full size) is sorted only when a sampled row has top_k 0. Each row
    draws its noise with its own generator over its own candidates, so a row's result does not depend on
    the other rows of the batch (a row sampled alone with the same generator state gives the same id).
    """
    B, V = logits.shape
    if len(rows) != B:
        raise ValueError(f"sample_rows got {B} logit rows and {len(rows)} settings")
    best = logits.argmax(-1)  # (B,)
    widths = [r.candidates(V) for r in rows]
    if all(r.greedy for r in rows):
        return best
    width = max(widths)
    dev = logits.device
    scores, ids = logits.float().topk(width, dim=-1, sorted=True)  # (B, W) best first
    t = _column([r.temperature if not r.greedy else 1.0 for r in rows], torch.float32, dev)
    p = _column([r.top_p for r in rows], torch.float32, dev)
    k = _column(widths, torch.long, dev)
    scores = (scores / t).masked_fill(torch.arange(width, device=dev)[None] >= k, float("-inf"))
    probs = scores.softmax(-1)  # (B, W)
    mass_before = probs.cumsum(-1) - probs  # probability of the better-ranked candidates
    probs = probs.masked_fill(mass_before >= p, 0.0)  # the best candidate always stays (mass_before 0)
    noise = torch.ones((B, width), device=dev)  # padding past a row's candidates: probability 0 there
    for i, r in enumerate(rows):
        if not r.greedy:
            noise[i, : widths[i]].exponential_(1.0, generator=r.generator)
    choice = ids.gather(1, (probs / noise).argmax(-1, keepdim=True))[:, 0]  # (B,)
    greedy = _column([r.greedy for r in rows], torch.bool, dev)[:, 0]
    return torch.where(greedy, best, choice)


def sample_logits(
    logits: Tensor,
    temperature: float | Tensor = 0.0,
    top_p: float | Tensor = 1.0,
    top_k: int | Tensor = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next ids (B,) from logits (B, V): settings as scalars or per-row tensors, one generator for all
    rows."""
    B = logits.shape[0]

    def per_row(value: float | int | Tensor) -> list:
        return value.reshape(-1).expand(B).tolist() if isinstance(value, Tensor) else [value] * B

    rows = [
        RowSampling(float(t), float(p), int(k), generator)
        for t, p, k in zip(per_row(temperature), per_row(top_p), per_row(top_k), strict=True)
    ]
    return sample_rows(logits, rows)

"""Next-token choice from logits: temperature -> top-k -> top-p, as transformers' warpers (REFERENCE §3.1)."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_logits(logits: Tensor, temperature: float | Tensor = 0.0, top_p: float | Tensor = 1.0,
                  top_k: int | Tensor = 0, generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """Next ids (B,) from logits (B, V): temperature -> top-k -> top-p, as transformers' warpers (§3.1).

    Scalars or per-row tensors; temperature 0 is greedy; top_k 0 / top_p 1 disable the filter. Sampling
    draws exponential noise (argmax(p / q), q ~ Exp(1)): no host sync, capturable.
    """
    if not isinstance(temperature, Tensor) and temperature <= 0:
        return logits.argmax(-1)
    B, V = logits.shape
    dev = logits.device
    t = torch.as_tensor(temperature, device=dev, dtype=torch.float32).reshape(-1, 1).expand(B, 1)
    p = torch.as_tensor(top_p, device=dev, dtype=torch.float32).reshape(-1, 1).expand(B, 1)
    k = torch.as_tensor(top_k, device=dev, dtype=torch.long).reshape(-1, 1).expand(B, 1)
    k = torch.where(k <= 0, V, k.clamp(max=V))
    sorted_logits, order = (logits.float() / t.clamp_min(1e-6)).sort(-1, descending=True)  # (B, V)
    rank = torch.arange(V, device=dev)[None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the better-ranked tokens
    probs = probs.masked_fill(mass_before >= p, 0.0)  # the best token always stays (mass_before 0)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    choice = order.gather(1, (probs / noise).argmax(-1, keepdim=True))[:, 0]
    return torch.where(t[:, 0] > 0, choice, logits.argmax(-1))

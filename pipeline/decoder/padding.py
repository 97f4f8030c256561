"""Right-padded batches of decoder rows of different lengths: the masks and the two operations whose result
would otherwise see the padding (convolutions read neighbours, GroupNorm averages over frames).

A padded batch must give every row what it would get alone, so every op that mixes frames sees only the row's
real frames: a convolution's input is zeroed past the row's length (alone, its zero padding is there),
GroupNorm's statistics are taken over the real frames only, attention keys past the length are masked. Ops
per frame (linear layers, activations, 1x1 convs) need nothing: what they leave in the padding is zeroed
before the next op that reads it. `mask=None` (rows of equal length) runs the plain ops unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def host_values(values: list[int] | list[bool], device: torch.device) -> torch.Tensor:
    """Small host lists (rows' lengths, seam flags) on the device without making the host wait for the queued
    GPU work (pinned memory, asynchronous copy); as they are on the CPU."""
    t = torch.tensor(values)
    return t if torch.device(device).type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def length_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """lengths (B,) int64 -> (B, 1, frames) bool, True on each row's real frames."""
    return (torch.arange(frames, device=lengths.device) < lengths.unsqueeze(1)).unsqueeze(1)


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, T) with its padding set to 0 (`where`, not a product: padding may hold any value)."""
    return x if mask is None else x.masked_fill(~mask, 0.0)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, mask: torch.Tensor | None) -> torch.Tensor:
    """`norm(x)` with each row's statistics over its real frames: x (B, C, T), mask (B, 1, T) or None."""
    if mask is None:
        return norm(x)
    b, c, t = x.shape
    g = norm.num_groups
    m = mask.view(b, 1, 1, t).float()
    xg = zero_padding(x, mask).float().view(b, g, c // g, t)
    count = (m.sum(dim=3, keepdim=True) * (c // g)).clamp(min=1.0)  # (B, 1, 1, 1)
    mean = xg.sum(dim=(2, 3), keepdim=True) / count
    var = ((xg - mean) * m).square().sum(dim=(2, 3), keepdim=True) / count  # biased, as GroupNorm
    y = ((xg - mean) * torch.rsqrt(var + norm.eps)).view(b, c, t).to(x.dtype)
    return y * norm.weight.view(1, -1, 1) + norm.bias.view(1, -1, 1)


def pad_frames(rows: list[torch.Tensor], frames: int | None = None) -> torch.Tensor:
    """(1, C, T_i) rows -> (B, C, frames) right-padded with zeros (frames: the longest row by default)."""
    frames = max(r.shape[-1] for r in rows) if frames is None else frames
    return torch.cat([F.pad(r, (0, frames - r.shape[-1])) for r in rows])

"""U-Net velocity estimator of the conditional flow matching (Matcha `ConditionalDecoder`), docs/decoder.md.

Input channels: x (80) | mu (80) | speaker vector broadcast (80) | prompt-mel condition (80). One down
block that halves time, one that keeps it, `num_mid_blocks` at half rate, two up blocks with skips; every
block is a ResNet1D + `n_blocks` full (non-causal) transformer blocks. The official float 0/1 attention
mask is added to the scores as +1 everywhere for an unpadded batch (softmax-invariant), and every
`* mask` multiplies by ones, so both are left out. Guidance runs as one batch of two.

Rows of different lengths (several replies' blocks in one batch) are right-padded and carry their lengths:
every convolution's input is zeroed past a row's length, GroupNorm and attention see only its real frames
(pipeline/decoder/padding.py), so each row gets what it would get alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.decoder.padding import group_norm, length_mask, zero_padding


@dataclass(frozen=True)
class EstimatorConfig:
    in_channels: int  # 320 = x, mu, spks, cond (80 each)
    out_channels: int  # 80 mel bins
    channels: tuple[int, ...]  # U-Net widths per level, (256, 256) in the release
    attention_head_dim: int  # 64
    n_blocks: int  # transformer blocks per U-Net block (4)
    num_mid_blocks: int  # 12
    num_heads: int  # 8

    @classmethod
    def from_yaml(cls, est: dict) -> EstimatorConfig:
        """`est`: the `flow.decoder.estimator` mapping of config.yaml."""
        if str(est.get("act_fn", "gelu")) != "gelu":
            raise ValueError(f"config.yaml estimator.act_fn {est.get('act_fn')!r}: only 'gelu' is supported")
        channels = tuple(int(c) for c in est["channels"])
        if not channels or any(c % 8 for c in channels):
            raise ValueError(f"config.yaml estimator.channels {channels}: need multiples of 8 (GroupNorm(8))")
        return cls(
            in_channels=int(est["in_channels"]),
            out_channels=int(est["out_channels"]),
            channels=channels,
            attention_head_dim=int(est["attention_head_dim"]),
            n_blocks=int(est["n_blocks"]),
            num_mid_blocks=int(est["num_mid_blocks"]),
            num_heads=int(est["num_heads"]),
        )


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Matcha SinusoidalPosEmb with scale 1000: t (1,) -> (1, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    emb = 1000 * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((emb.sin(), emb.cos()), dim=-1)


class _TimeMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(in_dim, dim), nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


class _Block1D(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(8, dim_out), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        conv, norm, act = self.block
        return act(group_norm(conv(zero_padding(x, mask)), norm, mask))


class _Resnet(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1, self.block2 = _Block1D(dim, dim_out), _Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(temb).unsqueeze(-1)  # (B, C, T) + (1, C, 1)
        return self.block2(h, mask) + self.res_conv(x)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k = nn.Linear(dim, inner, bias=False), nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C); keys (B, 1, 1, T) bool: the real frames each row attends to (None: all)."""
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)  # (B, H, T, hd)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class _GeluProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class _FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1, self.ff = _Attention(dim, heads, head_dim), _FeedForward(dim)

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), keys)
        return x + self.ff(self.norm3(x))


class _Resample(nn.Module):
    """Keys `…2.conv.*` of Matcha's Downsample1D / Upsample1D."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Estimator(nn.Module):
    def __init__(self, cfg: EstimatorConfig):
        super().__init__()
        self.cfg = cfg
        time_dim = cfg.channels[0] * 4
        self.time_mlp = _TimeMLP(cfg.in_channels, time_dim)
        ch = cfg.channels

        def stage(dim_in: int, dim: int, tail: nn.Module | None) -> nn.ModuleList:
            blocks = nn.ModuleList(
                _TransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim) for _ in range(cfg.n_blocks)
            )
            parts = [_Resnet(dim_in, dim, time_dim), blocks]
            return nn.ModuleList(parts + ([tail] if tail is not None else []))

        # Matcha layout: every level but the last halves time; the up path mirrors it.
        self.down_blocks = nn.ModuleList(
            stage(
                cfg.in_channels if i == 0 else ch[i - 1],
                c,
                _Resample(nn.Conv1d(c, c, 3, 2, 1)) if i < len(ch) - 1 else nn.Conv1d(c, c, 3, padding=1),
            )
            for i, c in enumerate(ch)
        )
        self.mid_blocks = nn.ModuleList(stage(ch[-1], ch[-1], None) for _ in range(cfg.num_mid_blocks))
        rev = ch[::-1] + (ch[0],)
        self.up_blocks = nn.ModuleList(
            stage(
                2 * rev[i],
                rev[i + 1],
                _Resample(nn.ConvTranspose1d(rev[i + 1], rev[i + 1], 4, 2, 1))
                if i < len(ch) - 1
                else nn.Conv1d(rev[i + 1], rev[i + 1], 3, padding=1),
            )
            for i in range(len(ch))
        )
        self.final_block = _Block1D(ch[0], ch[0])
        self.final_proj = nn.Conv1d(ch[0], cfg.out_channels, 1)

    def time_mlp_of(self, t: torch.Tensor) -> torch.Tensor:
        """t (1,) flow time -> (1, time_dim) embedding (the same for both guidance rows)."""
        return self.time_mlp(time_embedding(t, self.cfg.in_channels).to(self.final_proj.weight.dtype))

    @staticmethod
    def _transformers(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        keys = None if mask is None else mask.unsqueeze(1)  # (B, 1, 1, T)
        x = x.transpose(1, 2)  # (B, C, T) -> (B, T, C)
        for block in blocks:
            x = block(x, keys)
        return x.transpose(1, 2)

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, 320, T) stacked inputs, temb (1, time_dim), lengths (B,) real frames of each row (None: all
        T) -> velocity (B, 80, T)."""
        masks: list[torch.Tensor | None] = []  # per U-Net level (time halves from one to the next)
        frames = x.shape[-1]
        for _ in self.cfg.channels:
            masks.append(None if lengths is None else length_mask(lengths, frames))
            frames, lengths = (frames + 1) // 2, None if lengths is None else (lengths + 1) // 2
        skips = []
        for level, (resnet, blocks, resample) in enumerate(self.down_blocks):
            x = self._transformers(blocks, resnet(x, temb, masks[level]), masks[level])
            skips.append(x)
            x = resample(zero_padding(x, masks[level]))  # first: (B, C, ceil(T/2))
        for resnet, blocks in self.mid_blocks:
            x = self._transformers(blocks, resnet(x, temb, masks[-1]), masks[-1])
        for i, (resnet, blocks, resample) in enumerate(self.up_blocks):
            skip, mask = skips.pop(), masks[len(masks) - 1 - i]
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)  # (B, 2C, T_level)
            x = resample(zero_padding(self._transformers(blocks, resnet(x, temb, mask), mask), mask))
        return self.final_proj(self.final_block(x, masks[0]))

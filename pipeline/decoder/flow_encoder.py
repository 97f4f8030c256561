"""Flow encoder of the GLM-4-Voice decoder: block-causal relative-position Conformer + length regulator.

The official flow encoder (docs/decoder.md). Pre-LN Transformer-XL style layers (ESPnet relative positions,
learned `pos_bias_u/v`), no convolution module, no macaron FFN. Query i sees key j iff j <= i or both lie in
the same `block_size`-token block, blocks counted from index 0 of the (prompt + new) sequence. That makes the
states of every token in a complete block final once the block is complete: `EncoderCache` keeps them
(per-layer keys/values and outputs) so a streaming call only encodes the tokens after the last complete block.
Dropout layers of the official module are absent: we run in eval mode (see docs/decoder.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.decoder.padding import group_norm, host_values, zero_padding


@dataclass(frozen=True)
class EncoderConfig:
    input_size: int  # token embedding width (flow.input_size)
    d_model: int  # encoder.output_size
    num_heads: int  # encoder.attention_heads
    ffn_dim: int  # encoder.linear_units
    num_layers: int  # encoder.num_blocks
    block_size_tokens: int  # encoder.block_size: 10 tokens = 0.8 s (the attention grid)

    @classmethod
    def from_yaml(cls, enc: dict, input_size: int) -> EncoderConfig:
        """`enc`: the `flow.encoder` mapping of config.yaml (read as data)."""
        for key, expected in (
            ("input_layer", "linear"),
            ("pos_enc_layer_type", "rel_pos_espnet"),
            ("selfattention_layer_type", "block_rel_selfattn"),
        ):
            if str(enc.get(key, expected)) != expected:
                raise ValueError(
                    f"config.yaml flow.encoder.{key} is {enc.get(key)!r}; only {expected!r} is supported"
                )
        for key in ("use_cnn_module", "macaron_style"):
            if bool(enc.get(key, False)):
                raise ValueError(f"config.yaml flow.encoder.{key} is true; the GLM-4-Voice encoder has none")
        if not bool(enc.get("normalize_before", True)):
            raise ValueError("config.yaml flow.encoder.normalize_before is false; only pre-LN is supported")
        cfg = cls(
            input_size=int(enc.get("input_size", input_size)),
            d_model=int(enc["output_size"]),
            num_heads=int(enc["attention_heads"]),
            ffn_dim=int(enc["linear_units"]),
            num_layers=int(enc["num_blocks"]),
            block_size_tokens=int(enc.get("block_size", 10)),
        )
        if cfg.d_model % cfg.num_heads:
            raise ValueError(
                f"config.yaml flow.encoder: output_size {cfg.d_model} not divisible by heads {cfg.num_heads}"
            )
        return cfg


def relative_positions(length: int, d_model: int) -> torch.Tensor:
    """ESPnet relative sinusoid table, rows for relative positions +(T-1) ... -(T-1): (2T-1, D)."""
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pos = torch.zeros(length, d_model)
    neg = torch.zeros(length, d_model)
    pos[:, 0::2] = torch.sin(position * div_term)
    pos[:, 1::2] = torch.cos(position * div_term)
    neg[:, 0::2] = torch.sin(-1 * position * div_term)
    neg[:, 1::2] = torch.cos(-1 * position * div_term)
    return torch.cat([torch.flip(pos, [0]), neg[1:]], dim=0)


class _Embed(nn.Module):
    """Keys `embed.out.0` (Linear) and `embed.out.1` (LayerNorm) as in the official LinearNoSubsampling."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(cfg.input_size, cfg.d_model), nn.LayerNorm(cfg.d_model, eps=1e-5))


class _RelAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.num_heads
        self.h, self.d_k = h, d // h
        self.linear_q, self.linear_k = nn.Linear(d, d), nn.Linear(d, d)
        self.linear_v, self.linear_out = nn.Linear(d, d), nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(h, self.d_k))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.h, self.d_k).transpose(-3, -2)  # (..., T, D) -> (..., H, T, dk)

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos: torch.Tensor,
        rel_index: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x (B, Tq, D) queries' inputs; k, v (B, H, Tk, dk) all keys; pos (2Tk-1, D); rel_index, mask
        (B, Tq, Tk)."""
        b, tq, _ = x.shape
        q = self.linear_q(x).view(b, tq, self.h, self.d_k)  # (B, Tq, H, dk)
        p = self.heads(self.linear_pos(pos))  # (H, 2Tk-1, dk)
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))  # (B, H, Tq, Tk)
        bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (B, H, Tq, 2Tk-1)
        bd = torch.gather(bd, 3, rel_index.unsqueeze(1).expand(-1, self.h, -1, -1))  # ESPnet rel_shift
        scores = ((ac + bd) / math.sqrt(self.d_k)).masked_fill(~mask.unsqueeze(1), -float("inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, Tq, dk)
        return self.linear_out(out.transpose(1, 2).reshape(b, tq, -1))  # (B, Tq, D)


class _FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(cfg.d_model, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class _Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self_attn, self.feed_forward = _RelAttention(cfg), _FeedForward(cfg)
        self.norm_mha = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.norm_ff = nn.LayerNorm(cfg.d_model, eps=1e-5)


@dataclass
class EncoderCache:
    """Per-call encoder state: keys/values and outputs of every token in a complete block."""

    keys: list[torch.Tensor] = field(default_factory=list)  # per layer (H, Tc, dk)
    values: list[torch.Tensor] = field(default_factory=list)  # per layer (H, Tc, dk)
    outputs: torch.Tensor | None = None  # (Tc, D) after after_norm
    length_tokens: int = 0  # Tc, a multiple of block_size_tokens

    def reset(self) -> None:
        self.keys, self.values, self.outputs, self.length_tokens = [], [], None, 0


class FlowEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = _Embed(cfg)
        self.encoders = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_layers))
        self.after_norm = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.register_buffer("pos_table", relative_positions(512, cfg.d_model), persistent=False)

    def _positions(self, length: int) -> torch.Tensor:
        """Rows +(T-1) ... -(T-1) of the relative table (grown on demand, as the official extend_pe)."""
        have = (self.pos_table.shape[0] + 1) // 2
        if have < length:
            self.pos_table = relative_positions(max(length, 2 * have), self.cfg.d_model).to(self.pos_table)
            have = (self.pos_table.shape[0] + 1) // 2
        return self.pos_table[have - length : have + length - 1]  # (2T-1, D)

    def forward(self, emb: torch.Tensor, cache: EncoderCache | None = None) -> torch.Tensor:
        """emb (T, input_size) embeddings of the whole (prompt + new) sequence -> (T, D) encodings.

        With a cache, only tokens from `cache.length_tokens` on are computed; the cache then grows to
        the last complete block. Without one, everything is computed (the official path)."""
        return self.forward_rows([emb], [cache])[0]

    def forward_rows(self, embs: list[torch.Tensor], caches: list[EncoderCache | None]) -> list[torch.Tensor]:
        """Several sequences (one per reply, each with its own cache or none) as one right-padded batch:
        queries are each row's uncached tokens, keys its cached + new ones, padded keys masked."""
        totals = [e.shape[0] for e in embs]
        starts = [c.length_tokens if c is not None else 0 for c in caches]
        news = [t - s for t, s in zip(totals, starts, strict=True)]
        tq, tk, device = max(news), max(totals), embs[0].device
        qi = host_values(starts, device).unsqueeze(1) + torch.arange(tq, device=device)  # (B, Tq)
        qi, kj = qi.unsqueeze(2), torch.arange(tk, device=device)  # (B, Tq, 1) absolute query index, (Tk,)
        block = self.cfg.block_size_tokens
        mask = (kj <= qi) | (kj // block == qi // block)  # (B, Tq, Tk) block-causal grid
        if len(set(totals)) > 1:
            mask = mask & (kj < host_values(totals, device).view(-1, 1, 1))  # a row's own keys
        rel_index = (tk - 1 - qi + kj).clamp(min=0)  # (B, Tq, Tk) row of relative position qi - kj
        # (clamped: only a padded query past the longest row's end reaches below 0; its output is dropped)
        pos = self._positions(tk).to(embs[0].dtype)
        rows = [F.pad(e[s:], (0, 0, 0, tq - n)) for e, s, n in zip(embs, starts, news, strict=True)]
        x = self.embed.out(torch.stack(rows)) * math.sqrt(self.cfg.d_model)  # (B, Tq, D)
        new_keys: list[list[torch.Tensor]] = [[] for _ in embs]  # per row, per layer (H, T, dk)
        new_values: list[list[torch.Tensor]] = [[] for _ in embs]
        for i, layer in enumerate(self.encoders):
            attn = layer.self_attn
            h = layer.norm_mha(x)
            k, v = attn.heads(attn.linear_k(h)), attn.heads(attn.linear_v(h))  # (B, H, Tq, dk)
            for b, (cache, s, n) in enumerate(zip(caches, starts, news, strict=True)):
                row_k, row_v = k[b, :, :n], v[b, :, :n]
                if cache is not None and s > 0:
                    row_k = torch.cat([cache.keys[i], row_k], dim=1)
                    row_v = torch.cat([cache.values[i], row_v], dim=1)
                new_keys[b].append(row_k)
                new_values[b].append(row_v)
            k = torch.stack([F.pad(r[i], (0, 0, 0, tk - r[i].shape[1])) for r in new_keys])  # (B, H, Tk, dk)
            v = torch.stack([F.pad(r[i], (0, 0, 0, tk - r[i].shape[1])) for r in new_values])
            x = x + attn(h, k, v, pos, rel_index, mask)
            x = x + layer.feed_forward(layer.norm_ff(x))
        out = self.after_norm(x)  # (B, Tq, D)
        return [
            self._update(cache, out[b, :n], new_keys[b], new_values[b], total)
            for b, (cache, n, total) in enumerate(zip(caches, news, totals, strict=True))
        ]

    def _update(
        self,
        cache: EncoderCache | None,
        out: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        total: int,
    ) -> torch.Tensor:
        """One row's encodings (T, D) of the whole sequence; its cache grows to the last complete block."""
        if cache is None:
            return out
        start = cache.length_tokens
        full = out if cache.outputs is None or start == 0 else torch.cat([cache.outputs, out], dim=0)
        done = (total // self.cfg.block_size_tokens) * self.cfg.block_size_tokens
        cache.keys = [k[:, :done] for k in keys]
        cache.values = [v[:, :done] for v in values]
        cache.outputs, cache.length_tokens = full[:done], done
        return full


class LengthRegulator(nn.Module):
    """`InterpolateRegulator`: nearest resize to the mel frame count, then convs with GroupNorm(1, C).

    The GroupNorm normalises over all channels and all frames, so no frame of it can be cached."""

    def __init__(self, channels: int, num_convs: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(1, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, channels, 1, 1))
        self.model = nn.Sequential(*layers)

    @staticmethod
    def resize(h: torch.Tensor, frames: int) -> torch.Tensor:
        """h (1, T, C) projected encodings -> (1, C, frames), nearest."""
        return F.interpolate(h.transpose(1, 2).contiguous(), size=frames, mode="nearest")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, F) resized encodings, right-padded rows with mask (B, 1, F) -> mu (B, C, F)."""
        layers = list(self.model)
        for conv, norm, act in zip(layers[0:-1:3], layers[1:-1:3], layers[2:-1:3], strict=True):
            x = act(group_norm(conv(zero_padding(x, mask)), norm, mask))
        return layers[-1](x)

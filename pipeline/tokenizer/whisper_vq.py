"""The GLM-4-Voice tokenizer network (WhisperVQEncoder), run one attention block at a time.

Official model (docs/speech_tokenizer.md): causal convs (left pad 2) + GELU, learned positions, the first
`quantize_position` Whisper pre-LN layers, a block-causal mask over 50 Hz frames (query i sees key j iff
j <= i or both are in the same `quantize_causal_block_size` block; padding keys masked), average pooling by
`pooling_kernel_size`, nearest-codeword L2 argmin. Under that mask, block b depends only on blocks <= b,
so the encoder runs block by block with a per-layer key/value cache: the same code serves the offline
path and the stream, and a block's result is the same bits whichever path computed it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.tokenizer.log_mel import LogMelSettings

CONV_STRIDE = 2  # conv1 stride 1, conv2 stride 2: 100 Hz mel frames -> 50 Hz encoder frames
CONV_KERNEL = 3  # both convs; causal left pad = kernel - 1 = 2
CONV_CONTEXT_MEL_FRAMES = 4  # encoder frame j reads mel frames 2j-4 .. 2j (two causal k=3 convs)


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    """Sizes of one checkpoint, from its `config.json` and `preprocessor_config.json`."""

    d_model: int  # 1280 (hidden width)
    num_heads: int  # 20 (encoder_attention_heads)
    ffn_dim: int  # 5120 (encoder_ffn_dim)
    num_layers: int  # 16 (quantize_position: layers run before pooling + VQ)
    num_mel_bins: int  # 128
    max_positions: int  # 1500 encoder frames (30 s at 50 Hz; max_source_positions)
    pool_frames: int  # 4 encoder frames per token (pooling_kernel_size)
    block_frames: int  # 200 encoder frames = 4 s (quantize_causal_block_size)
    codebook_size: int  # 16384 (quantize_vocab_size)
    mel: LogMelSettings  # feature extraction (preprocessor_config.json)

    @property
    def samples_per_token(self) -> int:  # 1280 = hop 160 * conv stride 2 * pool 4 (padding unit)
        return self.mel.hop_samples * CONV_STRIDE * self.pool_frames

    @property
    def block_mel_frames(self) -> int:  # 400 mel frames per attention block
        return self.block_frames * CONV_STRIDE

    @classmethod
    def from_dir(cls, path: Path) -> SpeechTokenizerConfig:
        cfg = _read_json(path / "config.json")
        pre = _read_json(path / "preprocessor_config.json")
        expect = {
            "pooling_type": "avg",
            "encoder_causal_convolution": True,
            "activation_function": "gelu",
            "quantize_causal_encoder": False,
            "encoder_causal_attention": False,
        }
        for key, value in expect.items():
            if cfg.get(key) != value:
                raise ValueError(
                    f"{path / 'config.json'}: {key}={cfg.get(key)!r} is not supported (expected {value!r})"
                )
        if cfg.get("pooling_position") != cfg.get("quantize_position"):
            raise ValueError(f"{path / 'config.json'}: pooling_position must equal quantize_position")
        try:
            mel = LogMelSettings(
                sample_rate_hz=int(pre["sampling_rate"]),
                n_fft=int(pre["n_fft"]),
                hop_samples=int(pre["hop_length"]),
                n_mels=int(pre["feature_size"]),
                segment_samples=int(pre["chunk_length"]) * int(pre["sampling_rate"]),
            )
            config = cls(
                d_model=int(cfg["d_model"]),
                num_heads=int(cfg["encoder_attention_heads"]),
                ffn_dim=int(cfg["encoder_ffn_dim"]),
                num_layers=int(cfg["quantize_position"]),
                num_mel_bins=int(cfg["num_mel_bins"]),
                max_positions=int(cfg["max_source_positions"]),
                pool_frames=int(cfg["pooling_kernel_size"]),
                block_frames=int(cfg["quantize_causal_block_size"]),
                codebook_size=int(cfg["quantize_vocab_size"]),
                mel=mel,
            )
        except KeyError as err:
            raise ValueError(f"{path}: config.json or preprocessor_config.json lacks key {err}") from None
        if config.mel.n_mels != config.num_mel_bins:
            raise ValueError(
                f"{path}: feature_size {config.mel.n_mels} != num_mel_bins {config.num_mel_bins}"
            )
        if config.block_frames % config.pool_frames:
            raise ValueError(f"{path}: quantize_causal_block_size must be a multiple of pooling_kernel_size")
        if config.mel.segment_samples // config.mel.hop_samples > config.max_positions * CONV_STRIDE:
            raise ValueError(f"{path}: a {pre['chunk_length']} s segment exceeds max_source_positions")
        return config


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"speech tokenizer: missing file {path}")
    return json.loads(path.read_text())


class EncoderLayer(nn.Module):
    """Whisper pre-LN layer; parameter names are the checkpoint's (k_proj has no bias)."""

    def __init__(self, c: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(c.d_model, c.d_model)
        self.self_attn.k_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.self_attn.v_proj = nn.Linear(c.d_model, c.d_model)
        self.self_attn.out_proj = nn.Linear(c.d_model, c.d_model)
        self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
        self.fc1 = nn.Linear(c.d_model, c.ffn_dim)
        self.fc2 = nn.Linear(c.ffn_dim, c.d_model)
        self.final_layer_norm = nn.LayerNorm(c.d_model)
        self.num_heads = c.num_heads

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], start: int, n_keys: int
    ) -> torch.Tensor:
        """x (B, T, d): one block at encoder frames [start, start + T). kv: this layer's preallocated
        key/value buffers (B, H, max_positions, hd), holding frames [0, start) of the earlier blocks.

        Every query of a block may see every earlier key and every key of its own block (block-causal
        mask), except keys at or after `n_keys` (padding frames of the last block).
        """
        B, T, d = x.shape
        attn = self.self_attn
        h = self.self_attn_layer_norm(x)
        q = attn.q_proj(h).view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, H, T, hd)
        kv[0][:, :, start : start + T] = attn.k_proj(h).view(B, T, self.num_heads, -1).transpose(1, 2)
        kv[1][:, :, start : start + T] = attn.v_proj(h).view(B, T, self.num_heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, kv[0][:, :, :n_keys], kv[1][:, :, :n_keys])  # (B, H, T, hd)
        x = x + attn.out_proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperVQEncoder(nn.Module):
    """Shared and stateless: the caller owns each segment's key/value cache."""

    def __init__(self, c: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.config = c
        self.conv1 = nn.Conv1d(c.num_mel_bins, c.d_model, CONV_KERNEL)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, CONV_KERNEL, stride=CONV_STRIDE)
        self.embed_positions = nn.Embedding(c.max_positions, c.d_model)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_layers))
        self.codebook = nn.Embedding(c.codebook_size, c.d_model)  # kept float32 for the distances

    def codebook_sq(self) -> torch.Tensor:
        """(V,) float32 squared norms of the codewords."""
        code = self.codebook.weight.detach().float()
        return (code * code).sum(1)

    def embed(self, feats: torch.Tensor, first_block: bool, first_frame: int) -> torch.Tensor:
        """Normalised mel (B, n_mels, T_in) -> (B, T, d) at encoder frames [first_frame, first_frame + T).

        `feats` starts CONV_CONTEXT_MEL_FRAMES before the block, except for the first block, whose left
        context is the convs' zero padding (zeros of each conv's own input, as CausalConv1d pads).
        """
        x = feats.to(self.conv1.weight.dtype)
        pad = CONV_KERNEL - 1
        x = F.gelu(self.conv1(F.pad(x, (pad, 0)) if first_block else x))  # (B, d, T_in)
        x = F.gelu(self.conv2(F.pad(x, (pad, 0)) if first_block else x))  # (B, d, T)
        x = x.transpose(1, 2)  # (B, T, d)
        return x + self.embed_positions.weight[first_frame : first_frame + x.shape[1]]

    def new_cache(self, batch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer key/value buffers for one 30 s segment: (B, H, max_positions, hd) each, written by
        position (2 x layers x 1500 x d_model x 4 B = 245 MB at the real sizes in float32)."""
        c, w = self.config, self.conv1.weight
        shape = (batch, c.num_heads, c.max_positions, c.d_model // c.num_heads)
        return [
            (
                torch.empty(shape, dtype=w.dtype, device=w.device),
                torch.empty(shape, dtype=w.dtype, device=w.device),
            )
            for _ in self.layers
        ]

    def encode_block(
        self, x: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]], start: int, n_keys: int
    ) -> torch.Tensor:
        """(B, T, d) embedded block at frames [start, start + T) -> (B, T, d) after the last layer; writes the
        block's keys/values into `kv`."""
        for layer, layer_kv in zip(self.layers, kv, strict=True):
            x = layer(x, layer_kv, start, n_keys)
        return x

    def quantize(self, h: torch.Tensor, code_sq: torch.Tensor) -> torch.Tensor:
        """(B, T, d) with T a multiple of pool_frames -> (B, T / pool) token ids (nearest codeword, fp32 L2).

        `code_sq`: (V,) squared codeword norms, computed once per model (`codebook_sq`)."""
        B, T, d = h.shape
        pooled = h.float().view(B, T // self.config.pool_frames, self.config.pool_frames, d).mean(2)
        flat = pooled.reshape(-1, d)  # (B * T / pool, d)
        # ||c||^2 + ||h||^2 - 2 h.c as one addmm, the official formula
        dist = torch.addmm(
            code_sq[None] + (flat * flat).sum(1, keepdim=True),
            flat,
            self.codebook.weight.T,
            beta=1.0,
            alpha=-2.0,
        )  # (B * T / pool, V)
        return dist.argmin(dim=1).view(B, -1)


# Checkpoint keys that inference does not read: the VQ's EMA training buffers, the post-VQ position table
# (irrelevant to token ids), and layers past quantize_position / the final LayerNorm of a full encoder.
def _unused_key(key: str, num_layers: int) -> bool:
    if key in ("ema_count", "ema_weight", "embed_positions2.weight") or key.startswith("layer_norm."):
        return True
    parts = key.split(".")
    return parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) >= num_layers


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Key -> the safetensors file that holds it (single file, or shards listed by the index)."""
    from safetensors import safe_open

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map'")
        files = {key: path / name for key, name in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise FileNotFoundError(f"speech tokenizer: shard {file} named by {index} is missing")
        return files
    if not single.is_file():
        raise FileNotFoundError(f"speech tokenizer: missing file {single} (nor {index.name})")
    with safe_open(single, "pt") as f:
        return {key: single for key in f.keys()}


def load_weights(model: WhisperVQEncoder, path: Path) -> None:
    """Fill `model` from an official tokenizer directory; clear errors name the file and key."""
    from safetensors import safe_open

    files = _checkpoint_files(path)
    wanted = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, target in wanted.items():
        if key not in files:
            where = sorted({f.name for f in files.values()})
            raise ValueError(f"speech tokenizer: key {key!r} missing from {path} ({', '.join(where)})")
        with safe_open(files[key], "pt") as f:
            tensor = f.get_tensor(key)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"speech tokenizer: {files[key]}: key {key!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(target.shape)}"
            )
        loaded[key] = tensor.float()
    for key in files:
        if key not in wanted and not _unused_key(key, model.config.num_layers):
            raise ValueError(
                f"speech tokenizer: {files[key]}: unexpected key {key!r} (not a WhisperVQEncoder?)"
            )
    model.load_state_dict(loaded)

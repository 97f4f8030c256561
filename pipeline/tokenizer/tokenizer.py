"""GLM-4-Voice speech tokenizer: 16 kHz speech -> 12.5 Hz token ids, offline and streamed by 4 s blocks.

Official semantics (docs/speech_tokenizer.md): audio is cut into independent 30 s segments; each is
zero-padded to a multiple of 1280 samples (one token); log-mel frames are floored at (segment max - 8); the
encoder (pipeline/tokenizer/whisper_vq.py) is block-causal over 200-frame (4 s) blocks; a segment of N samples
gives ceil(N / 1280) tokens. Both paths below run the same per-chunk log-mel and per-block encoder calls with
the same shapes, so a stream's final tokens are the same bits as `tokenize()` of the same audio.

Streaming: a block's tokens are returned by `push()` once its 4 s of audio are in, computed with the floor
known at that time (the max so far) and the cache of earlier blocks. Only the floor is not causal: at the
end of a segment (`flush()`, or 30 s reached) the exact floor is known, every cached block whose inputs are
unchanged under it is kept (`block_is_exact`), and the rest is recomputed. Tokens that changed are reported
by `TokenizerStream.first_changed` so a caller that used them early can roll back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.audio_format import MODEL_INPUT_RATE_HZ
from pipeline.tokenizer.log_mel import DYNAMIC_RANGE, LogMel, normalize
from pipeline.tokenizer.whisper_vq import (
    CONV_CONTEXT_MEL_FRAMES,
    CONV_STRIDE,
    SpeechTokenizerConfig,
    WhisperVQEncoder,
    load_weights,
)

__all__ = ["SpeechTokenizer", "SpeechTokenizerConfig"]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: key, value buffers (1, H, max_positions, hd)


@dataclass
class SegmentState:
    """One 30 s segment in progress: its audio, raw log-mel frames and the encoder cache of its blocks.

    Chunk c holds mel frames [M c - 1, M c + M - 1) (M = mel frames per block): exactly the frames that
    become final when block c's audio is complete, so chunk c and block c are computed together.
    """

    audio: np.ndarray  # (segment_samples,) float32; [:n_samples] is real audio
    raw: torch.Tensor  # (n_mels, segment_frames) raw log10 mel; chunks [0, n_chunks) are filled
    n_samples: int = 0
    n_chunks: int = 0
    kv: KV | None = None  # encoder key/value buffers; frames of blocks [0, len(block_tokens)) are valid
    block_floor: list[float] = field(default_factory=list)  # log10 floor each cached block was computed with
    block_min: list[float] = field(default_factory=list)  # smallest raw value among the block's input frames
    block_tokens: list[list[int]] = field(default_factory=list)
    blocks_encoded: int = 0  # encoder block calls made for this state (cache statistics; not reset)

    def reset(self) -> None:  # keeps the buffers for the next segment
        self.n_samples = self.n_chunks = 0
        self.block_floor, self.block_min, self.block_tokens = [], [], []

    def truncate_blocks(self, n_blocks: int) -> None:
        """Forget blocks >= n_blocks (their buffer rows are simply overwritten later)."""
        del self.block_floor[n_blocks:], self.block_min[n_blocks:], self.block_tokens[n_blocks:]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def block_is_exact(block_floor: float, block_min: float, final_floor: float) -> bool:
    """A block computed with `block_floor` has the same input features under `final_floor` iff no raw value
    of its inputs lies below either floor (or the floors are equal)."""
    return block_floor == final_floor or block_min >= max(block_floor, final_floor)


def as_mono_float32(
    wav: np.ndarray, sample_rate_hz: int, expected_hz: int, allow_resample: bool = True
) -> np.ndarray:
    """Validate and convert input audio. Conversions (documented in docs/speech_tokenizer.md):
    int16 / 32768, int32 / 2**31, float64/float16 -> float32, (1, N) or (N, 1) -> (N,), other sample rates
    resampled with soxr (HQ). Stereo, NaN/Inf, other dtypes -> ValueError."""
    if not isinstance(wav, np.ndarray):
        raise TypeError(f"audio must be a numpy array, got {type(wav).__name__}")
    if wav.ndim == 2 and 1 in wav.shape:
        wav = wav.reshape(-1)
    if wav.ndim != 1:
        raise ValueError(
            f"audio must be mono (N,), got shape {wav.shape}; pass one channel (the official "
            "tokenizer keeps channel 0) or a mix-down"
        )
    if wav.dtype == np.int16:
        wav = wav.astype(np.float32) / 32768.0
    elif wav.dtype == np.int32:
        wav = (wav.astype(np.float64) / 2.0**31).astype(np.float32)
    elif wav.dtype in (np.float64, np.float16):
        wav = wav.astype(np.float32)
    elif wav.dtype != np.float32:
        raise ValueError(f"audio dtype {wav.dtype} not supported: use float32 in [-1, 1] or int16/int32 PCM")
    if not np.isfinite(wav).all():
        bad = np.flatnonzero(~np.isfinite(wav))
        raise ValueError(f"audio has {bad.size} NaN/Inf samples (first at index {bad[0]})")
    if sample_rate_hz != expected_hz:
        if not allow_resample:
            raise ValueError(f"stream audio must be {expected_hz} Hz, got {sample_rate_hz} Hz")
        if sample_rate_hz <= 0:
            raise ValueError(f"sample rate must be positive, got {sample_rate_hz}")
        import soxr

        wav = soxr.resample(wav, sample_rate_hz, expected_hz, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(wav)


class SpeechTokenizer:
    """Shared and stateless after loading; per-utterance state lives in SegmentState / TokenizerStream."""

    def __init__(
        self, config: SpeechTokenizerConfig, encoder: WhisperVQEncoder, device: torch.device
    ) -> None:
        self.config = config
        self.encoder = encoder
        self.device = device
        self.log_mel = LogMel(config.mel, device)
        self.code_sq = encoder.codebook_sq()  # (V,) once, not per call

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> SpeechTokenizer:
        """Load an official `glm-4-voice-tokenizer` directory (config.json, preprocessor_config.json,
        model.safetensors or shards + index). bf16/fp16 are for GPUs; distances stay float32."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"speech tokenizer: directory {path} does not exist")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"speech tokenizer: dtype {dtype} not supported (float32, bfloat16, float16)")
        config = SpeechTokenizerConfig.from_dir(path)
        encoder = WhisperVQEncoder(config)
        load_weights(encoder, path)
        device = torch.device(device)
        encoder = encoder.to(device=device, dtype=dtype).eval()
        encoder.codebook.float()
        return cls(config, encoder, device)

    # -- offline ---------------------------------------------------------------------------------------
    def tokenize(self, wav: np.ndarray, sample_rate_hz: int = MODEL_INPUT_RATE_HZ) -> list[int]:
        """Token ids of one utterance (empty audio -> [])."""
        return self.tokenize_batch([wav], sample_rate_hz)[0]

    def tokenize_batch(
        self, wavs: list[np.ndarray], sample_rate_hz: int = MODEL_INPUT_RATE_HZ
    ) -> list[list[int]]:
        """Several utterances. Segments run one at a time, unpadded: the same tokens as one call each, and
        no work spent on the padding the official batch adds (a 31 s input costs 31 s, not 60)."""
        return [
            [t for seg in self._segments(wav, sample_rate_hz) for t in self.finish_segment(seg)]
            for wav in wavs
        ]

    def features(self, wav: np.ndarray, sample_rate_hz: int = MODEL_INPUT_RATE_HZ) -> list[torch.Tensor]:
        """Normalised log-mel (n_mels, frames) of each 30 s segment, as the official encoder receives it."""
        out = []
        for seg in self._segments(wav, sample_rate_hz):
            n_frames = self._padded_frames(seg.n_samples)
            floor = self._fill_chunks(seg, n_frames)
            out.append(normalize(seg.raw[:, :n_frames], floor))
        return out

    def _segments(self, wav: np.ndarray, sample_rate_hz: int) -> Iterator[SegmentState]:
        """Validated audio cut into the official independent 30 s segments (one reused state)."""
        wav = as_mono_float32(wav, sample_rate_hz, self.config.mel.sample_rate_hz)
        seg, seg_samples = self.new_segment(), self.config.mel.segment_samples
        for start in range(0, len(wav), seg_samples):
            piece = wav[start : start + seg_samples]
            seg.reset()
            seg.audio[: len(piece)] = piece
            seg.n_samples = len(piece)
            yield seg

    # -- shared by both paths --------------------------------------------------------------------------
    def new_segment(self) -> SegmentState:
        m = self.config.mel
        return SegmentState(
            audio=np.zeros(m.segment_samples, dtype=np.float32),
            raw=torch.empty(m.n_mels, m.segment_samples // m.hop_samples, device=self.device),
        )

    def _padded_frames(self, n_samples: int) -> int:
        spt = self.config.samples_per_token
        return _ceil_div(n_samples, spt) * spt // self.config.mel.hop_samples

    def _chunk_frames(self, c: int, n_frames: int) -> tuple[int, int]:
        M = self.config.block_mel_frames
        return max(0, M * c - 1), min(M * c + M - 1, n_frames)

    def compute_chunk(self, seg: SegmentState, padded_samples: int, n_frames: int) -> None:
        first, end = self._chunk_frames(seg.n_chunks, n_frames)
        samples = self.log_mel.frame_samples(seg.audio, seg.n_samples, padded_samples, first, end)
        seg.raw[:, first:end] = self.log_mel.raw_frames(samples)  # (n_mels, end - first)
        seg.n_chunks += 1

    def _fill_chunks(self, seg: SegmentState, n_frames: int) -> torch.Tensor:
        """Compute the chunks not yet computed for the segment's final length; returns its exact floor."""
        padded = n_frames * self.config.mel.hop_samples
        while self._chunk_frames(seg.n_chunks, n_frames)[0] < n_frames:
            self.compute_chunk(seg, padded, n_frames)
        return seg.raw[:, :n_frames].max() - DYNAMIC_RANGE

    @torch.inference_mode()
    def encode_next_block(
        self, seg: SegmentState, floor: torch.Tensor, n_frames: int, n_valid_frames: int
    ) -> list[int]:
        """Run block b = len(seg.block_tokens) over mel frames [M b - 4, min(M b + M - 1, n_frames)) with
        `floor`, extending the segment's cache; returns the block's token ids (padding tokens included)."""
        c, b = self.config, len(seg.block_tokens)
        start = max(0, c.block_mel_frames * b - CONV_CONTEXT_MEL_FRAMES)
        raw = seg.raw[:, start : min(c.block_mel_frames * (b + 1) - 1, n_frames)]  # (n_mels, T_in)
        x = self.encoder.embed(normalize(raw, floor)[None], b == 0, c.block_frames * b)  # (1, T, d)
        n_keys = min(n_valid_frames, c.block_frames * b + x.shape[1])
        if seg.kv is None:
            seg.kv = self.encoder.new_cache()
        h = self.encoder.encode_block(x, seg.kv, c.block_frames * b, n_keys)
        tokens = self.encoder.quantize(h, self.code_sq)[0].tolist()
        seg.block_floor.append(floor.item())
        seg.block_min.append(raw.min().item())
        seg.block_tokens.append(tokens)
        seg.blocks_encoded += 1
        return tokens

    def finish_segment(self, seg: SegmentState) -> list[int]:
        """Exact tokens of a segment whose audio is complete, reusing every cached block still exact."""
        if seg.n_samples == 0:
            return []
        c = self.config
        n_frames = self._padded_frames(seg.n_samples)
        floor = self._fill_chunks(seg, n_frames)
        seg.truncate_blocks(self.exact_blocks(seg, floor.item()))
        n_enc_frames = n_frames // CONV_STRIDE
        valid_enc_frames = _ceil_div(_ceil_div(seg.n_samples, c.mel.hop_samples), CONV_STRIDE)  # mask[::2]
        while len(seg.block_tokens) * c.block_frames < n_enc_frames:
            self.encode_next_block(seg, floor, n_frames, valid_enc_frames)
        tokens = [t for block in seg.block_tokens for t in block]
        return tokens[: _ceil_div(seg.n_samples, c.samples_per_token)]

    @staticmethod
    def exact_blocks(seg: SegmentState, floor: float) -> int:
        """How many leading cached blocks have the same inputs under `floor` (so their cache is reusable)."""
        keep = 0
        while keep < len(seg.block_tokens) and block_is_exact(
            seg.block_floor[keep], seg.block_min[keep], floor
        ):
            keep += 1
        return keep

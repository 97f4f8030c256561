"""Whisper log-mel features, computed in fixed-shape chunks so streaming and offline agree bit for bit.

Same math as transformers' `WhisperFeatureExtractor` torch path (4.44, the version the official
tokenizer was run with; docs/speech_tokenizer.md): periodic Hann(n_fft), centred STFT with reflect padding,
power spectrum, Slaney mel filters, log10(clamp(., 1e-10)); then, per 30 s segment,
max(x, max_over_segment - 8) and (x + 4) / 4. The last STFT frame is dropped, so a padded segment of
L samples has exactly L / hop frames.

The segment-wide floor is the only non-causal step, so this module keeps the raw log10 frames (before the
floor) and applies the floor separately (`normalize`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LOG_CLAMP = 1e-10  # power floor before log10 (WhisperFeatureExtractor)
DYNAMIC_RANGE = 8.0  # log10 units kept below the segment maximum (WhisperFeatureExtractor)


def _hz_to_mel_slaney(freq_hz: np.ndarray) -> np.ndarray:
    # Slaney scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per factor 6.4).
    log_step = 27.0 / np.log(6.4)
    linear = 3.0 * freq_hz / 200.0
    log_part = 15.0 + np.log(np.maximum(freq_hz, 1e-12) / 1000.0) * log_step
    return np.where(freq_hz >= 1000.0, log_part, linear)


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    log_step = np.log(6.4) / 27.0
    linear = 200.0 * mels / 3.0
    log_part = 1000.0 * np.exp(log_step * (np.minimum(mels, 1e3) - 15.0))  # np.where evaluates both sides
    return np.where(mels >= 15.0, log_part, linear)


def slaney_mel_filters(n_fft: int, n_mels: int, sample_rate_hz: int) -> np.ndarray:
    """Triangular Slaney-normalised mel filters over 0..sample_rate/2, float64 (n_mels, n_fft // 2 + 1)."""
    fft_freqs = np.linspace(0, sample_rate_hz // 2, n_fft // 2 + 1)
    mel_edges = np.linspace(
        _hz_to_mel_slaney(np.array(0.0)), _hz_to_mel_slaney(np.array(sample_rate_hz / 2.0)), n_mels + 2
    )
    edge_freqs = _mel_to_hz_slaney(mel_edges)  # (n_mels + 2,)
    widths = np.diff(edge_freqs)  # (n_mels + 1,)
    slopes = edge_freqs[None, :] - fft_freqs[:, None]  # (n_freq, n_mels + 2)
    falling = -slopes[:, :-2] / widths[:-1]
    rising = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(falling, rising))  # (n_freq, n_mels)
    filters *= 2.0 / (edge_freqs[2:] - edge_freqs[:-2])  # Slaney area normalisation
    return filters.T.copy()


@dataclass(frozen=True)
class LogMelSettings:
    """From `preprocessor_config.json` (WhisperFeatureExtractor)."""

    sample_rate_hz: int  # 16000
    n_fft: int  # 400 samples (25 ms window)
    hop_samples: int  # 160 samples (10 ms per frame)
    n_mels: int  # 128 (feature_size)
    segment_samples: int  # 480000 (chunk_length 30 s); audio is tokenized in independent segments


class LogMel:
    """Raw log10 mel frames of chosen frame ranges of one segment; tensors live on `device`."""

    def __init__(self, settings: LogMelSettings, device: torch.device) -> None:
        self.settings = settings
        self.window = torch.hann_window(settings.n_fft, device=device)  # periodic, as torch.stft's default
        filters = slaney_mel_filters(settings.n_fft, settings.n_mels, settings.sample_rate_hz)
        self.filters = torch.from_numpy(filters).to(device=device, dtype=torch.float32)  # (n_mels, n_freq)
        self.device = device

    def last_sample_needed(self, frame: int) -> int:
        """One past the last sample that frame `frame` (centred at frame * hop) reads."""
        return frame * self.settings.hop_samples + self.settings.n_fft // 2

    def frame_samples(
        self, audio: np.ndarray, n_valid: int, padded_len: int, first: int, end: int
    ) -> np.ndarray:
        """Samples read by frames [first, end) of a segment zero-padded to `padded_len`, reflect-padded by
        n_fft/2.

        `audio[:n_valid]` are the real samples; only frames whose window ends before n_valid (or any frame
        once the segment's length is final) give values that will not change.
        """
        half, hop = self.settings.n_fft // 2, self.settings.hop_samples
        idx = np.arange(first * hop - half, (end - 1) * hop + half)  # (hop * (n - 1) + n_fft,)
        idx = np.where(idx < 0, -idx, idx)  # reflect at the start (torch.stft center=True)
        idx = np.where(idx >= padded_len, 2 * (padded_len - 1) - idx, idx)  # reflect at the padded end
        out = np.zeros(idx.shape, dtype=np.float32)
        real = idx < n_valid
        out[real] = audio[idx[real]]
        return out

    def raw_frames(self, samples: np.ndarray) -> torch.Tensor:
        """(hop * (T - 1) + n_fft,) samples -> (n_mels, T) log10 mel power, float32, no floor yet."""
        s = self.settings
        x = torch.from_numpy(samples).to(self.device)
        frames = x.unfold(0, s.n_fft, s.hop_samples) * self.window  # (T, n_fft)
        power = torch.fft.rfft(frames, dim=-1).abs() ** 2  # (T, n_freq)
        mel = self.filters @ power.T  # (n_mels, T)
        return torch.clamp(mel, min=LOG_CLAMP).log10()


def normalize(raw: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Whisper scaling of raw log10 frames given the segment floor (segment max - 8)."""
    return (torch.maximum(raw, floor) + 4.0) / 4.0

"""HiFT vocoder of the GLM-4-Voice decoder: NSF source + ISTFTNet, mel (86.13 Hz) -> 22.05 kHz audio.

The official `HiFTGenerator.inference` (docs/decoder.md). F0 from a conv predictor; a harmonic sine source
(random initial phases, additive noise) upsampled to audio rate; its 16-point STFT is fused into a two-stage
transposed-conv generator whose output is a magnitude/phase spectrogram inverted by an ISTFT (n_fft 16, hop
4). Weight norm is folded into plain weights at load (pipeline/decoder/model.py). Random draws come from the
caller (`Draws`). The STFT, ISTFT and the sine source run in float32 whatever the module dtype.

Several replies' mels of different lengths run as one right-padded batch with their lengths: convolutions
read zeros past a row's end, the STFT reflects each row at its own end, the ISTFT overlap-adds only a row's
own frames (pipeline/decoder/padding.py), so each row gets what it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.decoder.padding import length_mask, zero_padding


@dataclass(frozen=True)
class HiftConfig:
    mel_bins: int  # in_channels, 80
    base_channels: int  # 512 in the release
    nb_harmonics: int  # overtones above F0 (8); the source has nb_harmonics + 1 sines
    sample_rate_hz: int  # 22050
    nsf_alpha: float  # sine amplitude 0.1
    nsf_sigma: float  # voiced noise std 0.003
    voiced_threshold_hz: float  # F0 above this is voiced (10 Hz)
    upsample_rates: tuple[int, ...]  # (8, 8)
    upsample_kernels: tuple[int, ...]  # (16, 16)
    n_fft: int  # istft n_fft 16
    hop: int  # istft hop 4
    resblock_kernels: tuple[int, ...]  # (3, 7, 11)
    resblock_dilations: tuple[tuple[int, ...], ...]
    source_resblock_kernels: tuple[int, ...]  # (7, 11)
    source_resblock_dilations: tuple[tuple[int, ...], ...]
    lrelu_slope: float  # 0.1 (the final LeakyReLU uses torch's default 0.01, as the official)
    audio_limit: float  # output clamp 0.99
    f0_cond_channels: int  # f0_predictor.cond_channels

    @property
    def samples_per_frame(self) -> int:
        """256 = prod(upsample_rates) * hop."""
        return int(np.prod(self.upsample_rates)) * self.hop

    @classmethod
    def from_yaml(cls, hift: dict) -> HiftConfig:
        """`hift`: the `hift` mapping of config.yaml (read as data)."""
        try:
            f0 = hift["f0_predictor"]
            if int(f0.get("num_class", 1)) != 1:
                raise ValueError("config.yaml hift.f0_predictor.num_class must be 1")
            return cls(
                mel_bins=int(hift["in_channels"]),
                base_channels=int(hift["base_channels"]),
                nb_harmonics=int(hift["nb_harmonics"]),
                sample_rate_hz=int(hift["sampling_rate"]),
                nsf_alpha=float(hift["nsf_alpha"]),
                nsf_sigma=float(hift["nsf_sigma"]),
                voiced_threshold_hz=float(hift["nsf_voiced_threshold"]),
                upsample_rates=tuple(int(u) for u in hift["upsample_rates"]),
                upsample_kernels=tuple(int(k) for k in hift["upsample_kernel_sizes"]),
                n_fft=int(hift["istft_params"]["n_fft"]),
                hop=int(hift["istft_params"]["hop_len"]),
                resblock_kernels=tuple(int(k) for k in hift["resblock_kernel_sizes"]),
                resblock_dilations=tuple(tuple(int(d) for d in ds) for ds in hift["resblock_dilation_sizes"]),
                source_resblock_kernels=tuple(int(k) for k in hift["source_resblock_kernel_sizes"]),
                source_resblock_dilations=tuple(
                    tuple(int(d) for d in ds) for ds in hift["source_resblock_dilation_sizes"]
                ),
                lrelu_slope=float(hift["lrelu_slope"]),
                audio_limit=float(hift["audio_limit"]),
                f0_cond_channels=int(f0["cond_channels"]),
            )
        except KeyError as err:
            raise ValueError(f"config.yaml: hift section lacks key {err}") from err


class _Snake(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.view(1, -1, 1)
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class _ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=(kernel * d - d) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, padding=(kernel - 1) // 2) for _ in dilations
        )
        self.activations1 = nn.ModuleList(_Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(_Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = c2(zero_padding(a2(c1(zero_padding(a1(x), mask))), mask)) + x
        return x


class _F0Predictor(nn.Module):
    """`ConvRNNF0Predictor`: 5 x (conv k3 + ELU) -> Linear -> |.|, F0 in Hz per mel frame."""

    def __init__(self, mel_bins: int, channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv1d(mel_bins if i == 0 else channels, channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = mel
        for conv, act in zip(self.condnet[0::2], self.condnet[1::2], strict=True):
            x = act(conv(zero_padding(x, mask)))
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))  # (B, T)


class _Source(nn.Module):
    """`SourceModuleHnNSF`: only the harmonic merge has weights (`m_source.l_linear`)."""

    def __init__(self, harmonics: int):
        super().__init__()
        self.l_linear = nn.Linear(harmonics + 1, 1)


class HiftGenerator(nn.Module):
    def __init__(self, cfg: HiftConfig):
        super().__init__()
        self.cfg = cfg
        base = cfg.base_channels
        self.m_source = _Source(cfg.nb_harmonics)
        self.conv_pre = nn.Conv1d(cfg.mel_bins, base, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernels, strict=True))
        )
        down_rates = np.cumprod([1, *cfg.upsample_rates[::-1][:-1]])[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(down_rates, cfg.source_resblock_kernels, cfg.source_resblock_dilations, strict=True)
        ):
            ch, u = base // 2 ** (i + 1), int(u)
            self.source_downs.append(
                nn.Conv1d(cfg.n_fft + 2, ch, 1, 1)
                if u == 1
                else nn.Conv1d(cfg.n_fft + 2, ch, u * 2, u, padding=u // 2)
            )
            self.source_resblocks.append(_ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            _ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernels, cfg.resblock_dilations, strict=True)
        )
        self.conv_post = nn.Conv1d(base // 2 ** len(self.ups), cfg.n_fft + 2, 7, 1, padding=3)
        self.f0_predictor = _F0Predictor(cfg.mel_bins, cfg.f0_cond_channels)
        n = np.arange(cfg.n_fft)
        window = (0.5 - 0.5 * np.cos(2 * np.pi * n / cfg.n_fft)).astype(np.float32)  # periodic Hann (scipy)
        self.register_buffer("stft_window", torch.from_numpy(window), persistent=False)
        # torch.istft's check, made once here: the overlap-added squared window (NOLA) never vanishes.
        frames = 2 * cfg.n_fft // cfg.hop + 1
        envelope = np.zeros(cfg.n_fft + cfg.hop * (frames - 1))
        for k in range(frames):
            envelope[k * cfg.hop : k * cfg.hop + cfg.n_fft] += window.astype(np.float64) ** 2
        if envelope[cfg.n_fft // 2 : -(cfg.n_fft // 2)].min() < 1e-11:
            raise ValueError(
                f"hift istft n_fft {cfg.n_fft}, hop {cfg.hop}: the Hann window's overlap-add vanishes"
            )

    def source(self, f0: torch.Tensor, phase: torch.Tensor, sine_noise: torch.Tensor) -> torch.Tensor:
        """f0 (B, T) Hz; phase (B, H+1, 1) raw U(-pi, pi) draws; sine_noise (B, H+1, 256T) N(0, 1) draws
        -> source (B, 1, 256T), float32 (causal in time: a row's padding never reaches its samples)."""
        cfg = self.cfg
        f0 = (
            f0.float().unsqueeze(-1).expand(-1, -1, cfg.samples_per_frame).reshape(f0.shape[0], 1, -1)
        )  # (B, 1, L) nearest
        harmonics = torch.arange(1, cfg.nb_harmonics + 2, device=f0.device, dtype=torch.float32).view(
            1, -1, 1
        )
        f_mat = f0 * harmonics / cfg.sample_rate_hz  # (1, H+1, L) cycles per sample
        theta = 2 * np.pi * (torch.cumsum(f_mat, dim=-1) % 1)
        phase = phase.float().clone()
        phase[:, 0, :] = 0  # the fundamental starts at phase 0
        sines = cfg.nsf_alpha * torch.sin(theta + phase)
        uv = (f0 > cfg.voiced_threshold_hz).float()  # (1, 1, L)
        noise = (uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3) * sine_noise.float()
        sines = sines * uv + noise  # (1, H+1, L)
        w, b = self.m_source.l_linear.weight.float(), self.m_source.l_linear.bias.float()
        return torch.tanh(F.linear(sines.transpose(1, 2), w, b)).transpose(1, 2)  # (1, 1, L)

    def _stft(self, source: torch.Tensor, samples: torch.Tensor | None) -> torch.Tensor:
        """source (B, 1, L) -> (B, n_fft + 2, L / hop + 1) real and imaginary parts, `torch.stft(center=True)`
        with each row reflected at its own end (`samples` (B,): its real length; None: all L)."""
        cfg, half = self.cfg, self.cfg.n_fft // 2
        x = source.squeeze(1)  # (B, L)
        if samples is None:
            spec = torch.stft(x, cfg.n_fft, cfg.hop, cfg.n_fft, window=self.stft_window, return_complex=True)
        else:
            i = torch.arange(-half, x.shape[-1] + half, device=x.device).unsqueeze(0)  # (1, L + n_fft)
            end = samples.unsqueeze(1) - 1
            i = torch.where(i < 0, -i, torch.where(i > end, 2 * end - i, i)).clamp(0, x.shape[-1] - 1)
            x = torch.gather(x, 1, i.expand(x.shape[0], -1))  # (B, L + n_fft): reflect-padded per row
            spec = torch.stft(
                x, cfg.n_fft, cfg.hop, cfg.n_fft, window=self.stft_window, center=False, return_complex=True
            )
        spec = torch.view_as_real(spec)  # (B, F, frames, 2)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)  # (B, 2F, frames)

    def decode(
        self, mel: torch.Tensor, source: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mel (B, 80, T), source (B, 1, 256T) float32, lengths (B,) real mel frames (None: all T)
        -> audio (B, 256T) float32 in [-0.99, 0.99] (a row's audio past 256 * its length is padding)."""
        cfg = self.cfg
        samples = None if lengths is None else lengths * cfg.samples_per_frame
        s_stft = self._stft(source, samples).to(mel.dtype)  # (B, n_fft + 2, 64T + 1)
        mask = None if lengths is None else length_mask(lengths, mel.shape[-1])
        x = self.conv_pre(zero_padding(mel, mask))
        kernels, rate = len(cfg.resblock_kernels), lengths
        for i, (up, u) in enumerate(zip(self.ups, cfg.upsample_rates, strict=True)):
            x = up(zero_padding(F.leaky_relu(x, cfg.lrelu_slope), mask))
            last = i == len(self.ups) - 1
            if last:
                x = F.pad(x, (1, 0), mode="reflect")
            if rate is not None:
                rate = rate * u + int(last)  # the STFT frame count: 64T + 1 after the last
                mask = length_mask(rate, x.shape[-1])
            down = self.source_downs[i](zero_padding(s_stft, self._frame_mask(samples, s_stft)))
            x = x + self.source_resblocks[i](down, mask)
            xs = self.resblocks[i * kernels](x, mask)
            for j in range(1, kernels):
                xs = xs + self.resblocks[i * kernels + j](x, mask)
            x = xs / kernels
        x = self.conv_post(zero_padding(F.leaky_relu(x), mask)).float()  # default slope 0.01, as the official
        half = cfg.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :half]), max=1e2)
        phase = torch.sin(x[:, half:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.clamp(self.istft(spec, mask), -cfg.audio_limit, cfg.audio_limit)

    def _frame_mask(self, samples: torch.Tensor | None, spec: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, frames) True on the STFT frames of each row's real samples (L / hop + 1 of them)."""
        return None if samples is None else length_mask(samples // self.cfg.hop + 1, spec.shape[-1])

    def istft(self, spec: torch.Tensor, frames_mask: torch.Tensor | None = None) -> torch.Tensor:
        """spec (B, n_fft/2 + 1, frames) complex -> (B, hop * (frames - 1)): `torch.istft(center=True)`
        without its host-side window check (an `.item()`, which a CUDA graph cannot record), same ops
        otherwise (equal up to float rounding, ~1e-7). The window's overlap-add never vanishes (checked at
        init).
        `frames_mask` (B, 1, frames): each row overlap-adds (and normalises by) its own frames only."""
        cfg, window = self.cfg, self.stft_window
        frames = spec.shape[-1]
        y = torch.fft.irfft(spec.transpose(1, 2), cfg.n_fft, dim=-1).transpose(1, 2) * window.view(1, -1, 1)
        weights = window.square().view(1, -1, 1).expand(1, -1, frames)
        if frames_mask is not None:
            y, weights = (
                zero_padding(y, frames_mask),
                zero_padding(weights.expand(y.shape[0], -1, -1), frames_mask),
            )
        size, kernel, stride = (1, cfg.n_fft + cfg.hop * (frames - 1)), (1, cfg.n_fft), (1, cfg.hop)
        y = F.fold(y, size, kernel, stride=stride)  # overlap-add: (B, 1, 1, samples)
        envelope = F.fold(weights, size, kernel, stride=stride)
        half = cfg.n_fft // 2
        return (y / envelope)[:, 0, 0, half:-half]

    def forward(
        self,
        mel: torch.Tensor,
        phase: torch.Tensor,
        sine_noise: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        seam: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mel (B, 80, T) -> (audio (B, 256T), source (B, 1, 256T), f0 (B, T)).

        `cache_source` (B, 1, n) overwrites the first n source samples (the official seam fix), of the rows
        where `seam` (B, 1, 1) bool is set (None: every row). `lengths` (B,): right-padded rows' mel
        frames."""
        mask = None if lengths is None else length_mask(lengths, mel.shape[-1])
        f0 = self.f0_predictor(mel, mask)
        source = self.source(f0, phase, sine_noise)
        if cache_source is not None and cache_source.shape[-1] > 0:
            n = cache_source.shape[-1]
            source[:, :, :n] = (
                cache_source if seam is None else torch.where(seam, cache_source, source[:, :, :n])
            )
        return self.decode(mel, source, lengths), source, f0

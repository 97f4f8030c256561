"""Flow of the GLM-4-Voice decoder: speech tokens -> 80-bin log-mel (`MaskedDiffWithXvec.inference`).

The official `MaskedDiffWithXvec.inference` + CFM (docs/decoder.md). Tokens [prompt | new] -> embedding ->
block-causal encoder -> Linear to 80 -> nearest resize to F = int(T / 12.5 * 22050 / 256) frames + conv
regulator = mu. The prompt's mel fills the first P frames of the condition; 10 Euler steps on a cosine time
grid with classifier-free guidance 0.7 (both estimator passes as one batch of two) turn noise into the mel;
the frames after the prompt are returned. The speaker vector is the affine layer's bias: GLM-4-Voice always
passes a zero x-vector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.decoder.flow_encoder import EncoderCache, EncoderConfig, FlowEncoder, LengthRegulator
from pipeline.decoder.flow_estimator import Estimator, EstimatorConfig

EULER_STEPS = 10  # `n_timesteps=10`, hard-coded in the official flow.inference (docs/decoder.md)
Sampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (mu, cond, noise) -> mel


@dataclass(frozen=True)
class FlowConfig:
    vocab_size: int  # speech tokens (16384 in the release)
    input_size: int  # token embedding width
    mel_bins: int  # flow.output_size, 80
    spk_embed_dim: int  # x-vector width (192); always zero in GLM-4-Voice
    token_rate_hz: float  # flow.input_frame_rate, 12.5 tokens/s
    mel_rate_hz: float  # sample_rate / 256 = 86.13 frames/s (the official code writes 22050 / 256)
    regulator_convs: int  # len(length_regulator.sampling_ratios)
    cfg_rate: float  # cfm_params.inference_cfg_rate, 0.7
    cosine_schedule: bool  # cfm_params.t_scheduler == 'cosine'
    encoder: EncoderConfig
    estimator: EstimatorConfig

    @classmethod
    def from_yaml(cls, flow: dict) -> FlowConfig:
        """`flow`: the `flow` mapping of config.yaml (read as data)."""
        try:
            dec, lr = flow["decoder"], flow["length_regulator"]
            cfm = dec["cfm_params"]
            cfm = cfm.get("content", cfm)  # `!new:omegaconf.DictConfig {content: {...}}`
            mel_bins = int(flow["output_size"])
            if int(lr.get("channels", mel_bins)) != mel_bins:
                raise ValueError(
                    f"config.yaml flow.length_regulator.channels must equal output_size {mel_bins}"
                )
            if str(cfm.get("solver", "euler")) != "euler":
                raise ValueError(
                    f"config.yaml cfm_params.solver {cfm.get('solver')!r}: only 'euler' is supported"
                )
            return cls(
                vocab_size=int(flow["vocab_size"]),
                input_size=int(flow["input_size"]),
                mel_bins=mel_bins,
                spk_embed_dim=int(flow["spk_embed_dim"]),
                token_rate_hz=float(flow["input_frame_rate"]),
                mel_rate_hz=22050 / 256,
                regulator_convs=len(lr.get("sampling_ratios", [1, 1, 1, 1])),
                cfg_rate=float(cfm["inference_cfg_rate"]),
                cosine_schedule=str(cfm.get("t_scheduler")) == "cosine",
                encoder=EncoderConfig.from_yaml(flow["encoder"], int(flow["input_size"])),
                estimator=EstimatorConfig.from_yaml(dec["estimator"]),
            )
        except KeyError as err:
            raise ValueError(f"config.yaml: flow section lacks key {err}") from err

    def frames_for(self, tokens: int) -> int:
        """Mel frames for a token count, with the official float32 arithmetic and truncation."""
        n = torch.tensor([tokens], dtype=torch.int32)
        return int((n / self.token_rate_hz * 22050 / 256).int()[0])


@dataclass
class FlowTrace:
    """Intermediates of one call, for parity tests (filled only when passed)."""

    encoder_out: torch.Tensor | None = None  # (T, D)
    encoder_proj_out: torch.Tensor | None = None  # (T, 80)
    mu: torch.Tensor | None = None  # (1, 80, F)


@dataclass
class FlowCache:
    """Per-stream flow state: the encoder's completed blocks, projected (see flow_encoder)."""

    encoder: EncoderCache = field(default_factory=EncoderCache)

    def reset(self) -> None:
        self.encoder.reset()


class _Decoder(nn.Module):
    """Holds the estimator under the official key prefix `decoder.estimator.`."""

    def __init__(self, cfg: EstimatorConfig):
        super().__init__()
        self.estimator = Estimator(cfg)


class FlowModel(nn.Module):
    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.mel_bins)
        self.encoder = FlowEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.d_model, cfg.mel_bins)
        self.length_regulator = LengthRegulator(cfg.mel_bins, cfg.regulator_convs)
        self.decoder = _Decoder(cfg.estimator)
        self._steps: dict[tuple[str, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def time_grid(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(t, dt) per Euler step, computed with the official float32 recurrence t += dt."""
        span = torch.linspace(0, 1, EULER_STEPS + 1)
        if self.cfg.cosine_schedule:
            span = 1 - torch.cos(span * 0.5 * torch.pi)
        t, dt, steps = span[0], span[1] - span[0], []
        for step in range(1, EULER_STEPS + 1):
            steps.append((t.reshape(1), dt))
            t = t + dt
            if step < EULER_STEPS:
                dt = span[step + 1] - t
        return steps

    def mu(
        self,
        tokens: torch.Tensor,
        frames: int,
        cache: FlowCache | None = None,
        trace: FlowTrace | None = None,
    ) -> torch.Tensor:
        """tokens (T,) int64 [prompt | new] on the model device -> mu (1, 80, frames)."""
        emb = self.input_embedding(tokens.clamp(min=0))  # (T, input_size)
        h = self.encoder(emb, cache.encoder if cache is not None else None)  # (T, D)
        proj = self.encoder_proj(h)  # (T, 80)
        mu = self.length_regulator(proj.unsqueeze(0), frames)  # (1, 80, F)
        if trace is not None:
            trace.encoder_out, trace.encoder_proj_out, trace.mu = h, proj, mu
        return mu

    def _steps_on(self, device: torch.device, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(time embedding, dt) per Euler step on the device: the same every block, made once."""
        key = (str(device), dtype)
        if key not in self._steps:
            est = self.decoder.estimator
            self._steps[key] = [
                (est.time_mlp_of(t.to(device)), dt.to(device=device, dtype=dtype))
                for t, dt in self.time_grid()
            ]
        return self._steps[key]

    def sample(self, mu: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Euler ODE from noise (B, 80, F) with guidance; mu, cond (B, 80, F) -> mel (B, 80, F).

        B streams of equal length (batched first blocks) run as one estimator batch of 2B: the B
        conditioned rows, then the B guidance rows that see zeros."""
        est = self.decoder.estimator
        batch, frames = mu.shape[0], mu.shape[-1]
        spks = self.spk_embed_affine_layer.bias.view(1, -1, 1).expand(batch, -1, frames)  # zero x-vector
        rows = torch.cat([mu, spks, cond], dim=1)  # (B, 240, F)
        rows = torch.cat([rows, torch.zeros_like(rows)])  # guidance rows see zeros: one batch of 2B
        x = noise
        w = self.cfg.cfg_rate
        for temb, dt in self._steps_on(mu.device, mu.dtype):
            v = est(torch.cat([x.repeat(2, 1, 1), rows], dim=1), temb)  # (2B, 80, F)
            x = x + dt * ((1.0 + w) * v[:batch] - w * v[batch:])
        return x

    def inference(
        self,
        tokens: torch.Tensor,
        prompt_mel: torch.Tensor,
        noise: torch.Tensor,
        cache: FlowCache | None = None,
        trace: FlowTrace | None = None,
        max_prompt_frames: int | None = None,
        sample: Sampler | None = None,
    ) -> torch.Tensor:
        """tokens (T,) = prompt + new; prompt_mel (1, 80, P); noise (1, 80, F) -> new mel (1, 80, F - P).

        `max_prompt_frames` (opt-in, not official): the estimator sees at most this many prompt frames
        (the encoder and regulator still see the whole reply); the noise keeps its frame positions.
        `sample`: runs the Euler loop in place of `self.sample` (the CUDA-graph replay,
        pipeline/decoder/graphs.py)."""
        frames = noise.shape[-1]
        prompt_frames = prompt_mel.shape[-1]
        if prompt_frames >= frames:
            raise ValueError(f"prompt mel has {prompt_frames} frames but the tokens give only {frames}")
        mu = self.mu(tokens, frames, cache, trace)
        cond = torch.zeros_like(mu)
        cond[:, :, :prompt_frames] = prompt_mel
        start = 0
        if max_prompt_frames is not None and prompt_frames > max_prompt_frames:
            start = prompt_frames - max_prompt_frames
        mel = (sample or self.sample)(mu[:, :, start:], cond[:, :, start:], noise[:, :, start:].to(mu.dtype))
        return mel[:, :, prompt_frames - start :]

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
from pipeline.decoder.padding import host_values, length_mask, pad_frames

EULER_STEPS = 10  # `n_timesteps=10`, hard-coded in the official flow.inference (docs/decoder.md)
# (mu, cond, noise, lengths or None) -> mel: FlowModel.sample or its CUDA-graph replay
Sampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


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
class FlowRow:
    """One reply's block for the flow: the official `flow.inference` arguments."""

    tokens: torch.Tensor  # (T,) int64 on the model device: prompt tokens + the block's tokens
    prompt_mel: torch.Tensor  # (1, 80, P) fed-back mel, model dtype
    noise: torch.Tensor  # (1, 80, F) N(0, 1) over every frame, the prompt's included
    cache: FlowCache | None  # the stream's encoder cache (grows in place), None = re-encode
    max_prompt_frames: int | None  # the estimator's prompt window (None = the whole prompt)


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
        rows: list[FlowRow],
        trace: FlowTrace | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's tokens -> mu (B, 80, max F), right-padded, and the rows' frame counts (None when equal).

        The encoder and the length regulator run as right-padded batches; the projection is resized to each
        row's frame count."""
        embs = [self.input_embedding(row.tokens.clamp(min=0)) for row in rows]  # (T, input_size) each
        hs = self.encoder.forward_rows(
            embs, [row.cache.encoder if row.cache is not None else None for row in rows]
        )
        resized = []
        for row, h in zip(rows, hs, strict=True):  # h (T, D)
            proj = self.encoder_proj(h)  # (T, 80)
            resized.append(self.length_regulator.resize(proj.unsqueeze(0), row.noise.shape[-1]))
            if trace is not None:
                trace.encoder_out, trace.encoder_proj_out = h, proj
        x = pad_frames(resized)  # (B, 80, F)
        lengths = _lengths([r.shape[-1] for r in resized], x.device)
        mu = self.length_regulator(x, None if lengths is None else length_mask(lengths, x.shape[-1]))
        if trace is not None:
            trace.mu = mu
        return mu, lengths

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

    def sample(
        self, mu: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Euler ODE from noise (B, 80, F) with guidance; mu, cond (B, 80, F) -> mel (B, 80, F).

        B rows (one per reply) run as one estimator batch of 2B: the B conditioned rows, then the B guidance
        rows that see zeros. `lengths` (B,): rows right-padded to F (None: every row is F frames)."""
        est = self.decoder.estimator
        batch, frames = mu.shape[0], mu.shape[-1]
        spks = self.spk_embed_affine_layer.bias.view(1, -1, 1).expand(batch, -1, frames)  # zero x-vector
        rows = torch.cat([mu, spks, cond], dim=1)  # (B, 240, F)
        rows = torch.cat([rows, torch.zeros_like(rows)])  # guidance rows see zeros: one batch of 2B
        both = None if lengths is None else lengths.repeat(2)
        x = noise
        w = self.cfg.cfg_rate
        for temb, dt in self._steps_on(mu.device, mu.dtype):
            v = est(torch.cat([x.repeat(2, 1, 1), rows], dim=1), temb, both)  # (2B, 80, F)
            x = x + dt * ((1.0 + w) * v[:batch] - w * v[batch:])
        return x

    def inference(
        self, rows: list[FlowRow], trace: FlowTrace | None = None, sample: Sampler | None = None
    ) -> list[torch.Tensor]:
        """Each row's new mel (1, 80, F - P): one `flow.inference` per row, run as one padded batch.

        A row's window (`max_prompt_frames`, opt-in, not official): the estimator sees at most that many
        prompt frames (the encoder and regulator still see the whole reply); the noise keeps its frame
        positions. `sample`: runs the Euler loop in place of `self.sample` (the CUDA-graph replay,
        pipeline/decoder/graphs.py)."""
        for row in rows:
            if row.prompt_mel.shape[-1] >= row.noise.shape[-1]:
                raise ValueError(
                    f"prompt mel has {row.prompt_mel.shape[-1]} frames but the tokens give only "
                    f"{row.noise.shape[-1]}"
                )
        mu, _ = self.mu(rows, trace)  # (B, 80, max F)
        windows, mus, conds, noises = [], [], [], []
        for b, row in enumerate(rows):
            frames, prompt = row.noise.shape[-1], row.prompt_mel.shape[-1]
            window = prompt if row.max_prompt_frames is None else min(prompt, row.max_prompt_frames)
            start = prompt - window
            cond = torch.zeros_like(mu[b : b + 1, :, :frames])
            cond[:, :, :prompt] = row.prompt_mel
            mus.append(mu[b : b + 1, :, start:frames])
            conds.append(cond[:, :, start:])
            noises.append(row.noise[:, :, start:].to(mu.dtype))
            windows.append(window)
        lengths = _lengths([m.shape[-1] for m in mus], mu.device)
        mel = (sample or self.sample)(pad_frames(mus), pad_frames(conds), pad_frames(noises), lengths)
        return [mel[b : b + 1, :, w : m.shape[-1]] for b, (w, m) in enumerate(zip(windows, mus, strict=True))]


def _lengths(frames: list[int], device: torch.device) -> torch.Tensor | None:
    """Rows' frame counts as a tensor, or None when they are all equal (no padding, the plain ops)."""
    return None if len(set(frames)) == 1 else host_values(frames, device)

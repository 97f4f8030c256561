"""GLM-4-Voice speech decoder: speech tokens -> flow matching mel -> HiFT -> 22.05 kHz audio.

Loads an official `glm-4-voice-decoder` directory (config.yaml read as data by pipeline/decoder/config.py,
flow.pt and hift.pt with `torch.load(weights_only=True)`, weight norm folded at load) into our plain-torch
modules, in eval mode. `SpeechDecoder` is shared and stateless; a reply's state lives in its
`DecoderStream` (pipeline/decoder/stream.py), which also holds the offline `synthesize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline.decoder.config import DecoderConfig
from pipeline.decoder.flow import FlowModel, FlowRow, FlowTrace
from pipeline.decoder.hift import HiftGenerator
from pipeline.decoder.padding import host_values, pad_frames


class BlockGraphs(Protocol):
    """Recorded CUDA graphs of a block's launch-heavy parts (pipeline/decoder/graphs.py `DecoderGraphs`, which
    imports this module: the decoder knows them only by this shape). Arguments as `FlowModel.sample` and
    `HiftGenerator.forward`."""

    def sample(
        self, mu: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, lengths: torch.Tensor | None
    ) -> torch.Tensor: ...

    def vocode(
        self,
        mel: torch.Tensor,
        phase: torch.Tensor,
        noise: torch.Tensor,
        cache_source: torch.Tensor | None,
        lengths: torch.Tensor | None,
        seam: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@dataclass
class VocodeRow:
    """One reply's block for the vocoder: the official `hift.inference` arguments with its draws."""

    mel: torch.Tensor  # (1, 80, T) float32
    phase: torch.Tensor  # (1, harmonics + 1, 1) U(-pi, pi) draws
    noise: torch.Tensor  # (1, harmonics + 1, 256T) N(0, 1) draws
    cache_source: torch.Tensor | None  # (1, 1, 256) the previous block's last source samples (the seam)


# ---------------------------------------------------------------- checkpoint files
def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ValueError(
            f"{path}: missing (a glm-4-voice-decoder directory holds flow.pt and hift.pt)"
        ) from err
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a state dict file"
        raise ValueError(
            f"{path}: not a state dict readable with torch.load(weights_only=True): {err}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors")
    return state


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weight_g`/`weight_v` (torch.nn.utils.weight_norm, dim 0) or the parametrisation keys -> `weight`."""
    out: dict[str, torch.Tensor] = {}
    pairs = {
        ".weight_g": ".weight_v",
        ".parametrizations.weight.original0": ".parametrizations.weight.original1",
    }
    for key, value in state.items():
        for g_suffix, v_suffix in pairs.items():
            if key.endswith(v_suffix):
                break
            if key.endswith(g_suffix):
                stem = key[: -len(g_suffix)]
                v = state.get(stem + v_suffix)
                if v is None:
                    raise ValueError(f"weight norm: {key} has no {stem + v_suffix}")
                out[stem + ".weight"] = torch._weight_norm(v, value, 0)
                break
        else:
            out[key] = value
    return out


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load with messages naming the file and the keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not match config.yaml: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)}, config.yaml gives "
                f"{tuple(expected[key].shape)}"
            )
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- the decoder
class SpeechDecoder:
    """Shared, stateless after load. One `DecoderStream` per reply."""

    def __init__(
        self,
        cfg: DecoderConfig,
        flow: FlowModel,
        hift: HiftGenerator,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.cfg, self.flow, self.hift = cfg, flow, hift
        self.device, self.dtype = device, dtype
        self.graphs: BlockGraphs | None = (
            None  # recorded block shapes (pipeline/decoder/graphs.py), else eager
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> SpeechDecoder:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(
                f"{path}: not a directory (expected glm-4-voice-decoder/ with config.yaml, flow.pt, hift.pt)"
            )
        cfg = DecoderConfig.from_yaml_file(path / "config.yaml")
        flow, hift = FlowModel(cfg.flow), HiftGenerator(cfg.hift)
        load_module_state(flow, _read_state(path / "flow.pt"), path / "flow.pt")
        load_module_state(hift, fold_weight_norm(_read_state(path / "hift.pt")), path / "hift.pt")
        device = torch.device(device)
        # Eval mode on purpose: the official AudioDecoder never calls .eval(), so its encoder dropout
        # (p = 0.1) stays live and its output is random; the parity fixtures were made in eval mode.
        flow.to(device=device, dtype=dtype).eval().requires_grad_(False)
        hift.to(device=device, dtype=dtype).eval().requires_grad_(False)
        hift.stft_window = hift.stft_window.float()
        return cls(cfg, flow, hift, device, dtype)

    @property
    def sample_rate_hz(self) -> int:
        return self.cfg.sample_rate_hz

    @property
    def num_tokens(self) -> int:
        """Speech vocabulary size (flow.vocab_size); valid ids are 0 .. num_tokens - 1."""
        return self.cfg.flow.vocab_size

    def flow_mels(self, rows: list[FlowRow], trace: FlowTrace | None = None) -> list[torch.Tensor]:
        """Each row's new mel (1, 80, F - P), model dtype; all rows as one batch (CUDA graphs when
        recorded)."""
        if not rows:
            return []
        return self.flow.inference(rows, trace, self.graphs.sample if self.graphs is not None else None)

    def vocode(self, rows: list[VocodeRow]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each row's (audio (1, 256T) float32, source (1, 1, 256T), f0 (1, T)); all rows as one right-padded
        batch with their lengths (CUDA graphs when recorded)."""
        if not rows:
            return []
        frames = [row.mel.shape[-1] for row in rows]
        seams = [row.cache_source is not None and row.cache_source.shape[-1] > 0 for row in rows]
        cache_source = None
        if any(seams):
            n = next(row.cache_source.shape[-1] for row, seam in zip(rows, seams, strict=True) if seam)
            blank = torch.zeros(1, 1, n, device=self.device)
            cache_source = torch.cat(
                [r.cache_source if seam else blank for r, seam in zip(rows, seams, strict=True)]
            )
        seam = None if all(seams) or not any(seams) else host_values(seams, self.device).view(-1, 1, 1)
        lengths = None if len(set(frames)) == 1 else host_values(frames, self.device)
        mel = pad_frames([row.mel for row in rows]).to(self.dtype)  # (B, 80, T)
        noise = pad_frames([row.noise for row in rows])  # (B, harmonics + 1, 256T)
        phase = torch.cat([row.phase for row in rows])
        vocoder = self.graphs.vocode if self.graphs is not None else self.hift
        audio, source, f0 = vocoder(mel, phase, noise, cache_source, lengths, seam)
        spf = self.cfg.hift.samples_per_frame
        return [
            (audio[b : b + 1, : t * spf], source[b : b + 1, :, : t * spf], f0[b : b + 1, :t])
            for b, t in enumerate(frames)
        ]

    def check_tokens(self, tokens: list[int]) -> list[int]:
        out = []
        for i, tok in enumerate(tokens):
            if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)):
                raise ValueError(f"speech token {i} is {tok!r}, not an int")
            if not 0 <= int(tok) < self.num_tokens:
                raise ValueError(f"speech token {i} is {int(tok)}, outside 0..{self.num_tokens - 1}")
            out.append(int(tok))
        return out

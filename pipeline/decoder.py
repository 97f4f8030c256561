"""GLM-4-Voice speech decoder: speech tokens -> flow matching mel -> HiFT -> 22.05 kHz audio.

Loads an official `glm-4-voice-decoder` directory (config.yaml read as data, flow.pt and hift.pt with
`torch.load(weights_only=True)`, weight norm folded at load) into our plain-torch modules, in eval mode.
`SpeechDecoder` is shared and stateless; a reply's state lives in its `DecoderStream`
(pipeline/decoder_stream.py). Random draws (flow noise, NSF phases and noise) come from a `Draws`
provider: by default the official recipe (seed 42 at every block) on the stream's own generators.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import yaml

from pipeline.flow import FlowConfig, FlowModel
from pipeline.hift import HiftConfig, HiftGenerator

TOKEN_OVERLAP = 5  # `token_overlap_len` of flow_inference.AudioDecoder: 5 tokens of mel cross-fade
MEL_CACHE_FRAMES = 1  # `mel_cache_len`: mel frames re-vocoded at each seam
OFFICIAL_SEED = 42  # ConditionalCFM.forward calls torch.manual_seed(42) at every decoder call


# ---------------------------------------------------------------- config.yaml as data
class _Ref(str):
    """`!ref <key>` kept as text until the whole document is read."""


class _DataLoader(yaml.SafeLoader):
    """Reads HyperPyYAML tags as plain values: `!new:`/`!name:` -> their mapping (+ `_class`), `!apply:` ->
    ignored, `!ref` -> resolved lookup. Never imports or builds anything."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> object:
    if isinstance(node, yaml.MappingNode):
        value = dict(loader.construct_mapping(node, deep=True))
        value["_class"] = suffix.partition(":")[2]  # `!new:pkg.Class` -> "pkg.Class" (never imported)
        return value
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    text = loader.construct_scalar(node)
    return _Ref(text) if suffix == "ref" else text


_DataLoader.add_multi_constructor("!", _tagged)


def _resolve(value: object, root: dict, path: str) -> object:
    if isinstance(value, _Ref):
        text = value.strip()
        if not (text.startswith("<") and text.endswith(">") and text.count("<") == 1):
            raise ValueError(f"config.yaml {path}: unsupported !ref expression {text!r}")
        target: object = root
        for part in text[1:-1].split("."):
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"config.yaml {path}: !ref {text} names no key")
            target = target[part]
        return _resolve(target, root, path)
    if isinstance(value, dict):
        return {k: _resolve(v, root, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def read_config_yaml(path: Path) -> dict:
    """config.yaml as a plain dict (tags read as values, `!ref`s resolved)."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_DataLoader)  # noqa: S506 - data-only loader
    except FileNotFoundError as err:
        raise ValueError(f"{path}: missing (a glm-4-voice-decoder directory holds config.yaml)") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not readable YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return _resolve(raw, raw, "")  # type: ignore[return-value]


@dataclass(frozen=True)
class DecoderConfig:
    sample_rate_hz: int  # 22050
    flow: FlowConfig
    hift: HiftConfig
    mel_overlap_frames: int  # int(5 / 12.5 * 22050 / 256) = 34 frames of Hamming cross-fade
    mel_cache_frames: int  # 1
    source_cache_samples: int  # 256 = mel_cache_frames * 256

    @classmethod
    def from_yaml_file(cls, path: Path) -> DecoderConfig:
        doc = read_config_yaml(path)
        for key in ("flow", "hift"):
            if not isinstance(doc.get(key), dict):
                raise ValueError(f"{path}: no '{key}' section")
        flow, hift = FlowConfig.from_yaml(doc["flow"]), HiftConfig.from_yaml(doc["hift"])
        sr = int(doc.get("sample_rate", hift.sample_rate_hz))
        if sr != hift.sample_rate_hz or hift.samples_per_frame != 256:
            raise ValueError(f"{path}: expected 22050 Hz audio at 256 samples per mel frame")
        return cls(sample_rate_hz=sr, flow=flow, hift=hift,
                   mel_overlap_frames=int(TOKEN_OVERLAP / flow.token_rate_hz * 22050 / 256),
                   mel_cache_frames=MEL_CACHE_FRAMES, source_cache_samples=MEL_CACHE_FRAMES * 256)


# ---------------------------------------------------------------- random draws
class Draws(Protocol):
    """Random numbers of one stream. `begin_block()` is called once per decoder block, before the others."""

    def begin_block(self) -> None: ...

    def flow_noise(self, frames: int) -> torch.Tensor: ...  # (1, 80, frames) N(0, 1), prompt frames included

    def source_phase(self, sines: int) -> torch.Tensor: ...  # (1, sines, 1) U(-pi, pi) (row 0 is zeroed later)

    def source_noise(self, sines: int, samples: int) -> torch.Tensor: ...  # (1, sines, samples) N(0, 1)


class OfficialDraws:
    """The official recipe on private generators: reseeded to 42 at every block; flow noise and source
    noise from the device generator, phases from the CPU one (on CPU both are one generator, as in the
    official code, which reproduces its draws exactly)."""

    def __init__(self, device: torch.device, mel_bins: int = 80, sines: int | None = None):
        self.device, self.mel_bins, self.sines = torch.device(device), mel_bins, sines
        self.cpu = torch.Generator("cpu")
        self.dev = self.cpu if self.device.type == "cpu" else torch.Generator(self.device)
        self._phase: torch.Tensor | None = None

    def begin_block(self) -> None:
        self.cpu.manual_seed(OFFICIAL_SEED)
        self.dev.manual_seed(OFFICIAL_SEED)
        self._phase = None
        if self.device.type != "cpu" and self.sines is not None:
            # The phases are the CPU generator's first draw; copying them now, before the block's GPU
            # work is queued, keeps the host from waiting on the flow mid-block.
            self._phase = self._draw_phase(self.sines).pin_memory().to(self.device, non_blocking=True)

    def flow_noise(self, frames: int) -> torch.Tensor:
        return torch.randn((1, self.mel_bins, frames), generator=self.dev, device=self.device)

    def _draw_phase(self, sines: int) -> torch.Tensor:
        low, high = torch.tensor(-np.pi, dtype=torch.float32), torch.tensor(np.pi, dtype=torch.float32)
        return low + torch.rand((1, sines, 1), generator=self.cpu) * (high - low)  # Uniform(-pi, pi).sample

    def source_phase(self, sines: int) -> torch.Tensor:
        if self._phase is not None and self._phase.shape[1] == sines:
            return self._phase
        return self._draw_phase(sines).to(self.device)

    def source_noise(self, sines: int, samples: int) -> torch.Tensor:
        return torch.randn((1, sines, samples), generator=self.dev, device=self.device)


class SeededDraws(OfficialDraws):
    """One generator seeded once per stream: fresh noise at every block (no reseeding)."""

    def __init__(self, device: torch.device, seed: int, mel_bins: int = 80):
        super().__init__(device, mel_bins, None)
        self.dev = torch.Generator(self.device).manual_seed(seed)
        self.cpu = self.dev if self.device.type == "cpu" else torch.Generator("cpu").manual_seed(seed)

    def begin_block(self) -> None:
        pass


class QueuedDraws:
    """Injected draws, one dict per block with any of `z`, `phase`, `sine_randn` (arrays of the official
    shapes); missing ones fall back to `fallback` (default: the official recipe)."""

    def __init__(self, blocks: list[dict[str, np.ndarray]], device: str | torch.device = "cpu",
                 fallback: Draws | None = None):
        self.blocks, self.index, self.device = list(blocks), -1, torch.device(device)
        self.fallback = fallback if fallback is not None else OfficialDraws(self.device)

    def begin_block(self) -> None:
        self.index += 1
        if self.index >= len(self.blocks):
            raise ValueError(f"QueuedDraws: block {self.index} has no injected draws ({len(self.blocks)} given)")
        self.fallback.begin_block()

    def _take(self, name: str, shape: tuple[int, ...], make: torch.Tensor) -> torch.Tensor:
        value = self.blocks[self.index].get(name)
        if value is None:
            return make
        tensor = torch.as_tensor(np.asarray(value, dtype=np.float32), device=self.device)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"QueuedDraws: block {self.index} {name} has shape {tuple(tensor.shape)}, need {shape}")
        return tensor

    def flow_noise(self, frames: int) -> torch.Tensor:
        return self._take("z", (1, self.fallback.mel_bins, frames), self.fallback.flow_noise(frames))

    def source_phase(self, sines: int) -> torch.Tensor:
        return self._take("phase", (1, sines, 1), self.fallback.source_phase(sines))

    def source_noise(self, sines: int, samples: int) -> torch.Tensor:
        return self._take("sine_randn", (1, sines, samples), self.fallback.source_noise(sines, samples))


# ---------------------------------------------------------------- checkpoint files
def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ValueError(f"{path}: missing (a glm-4-voice-decoder directory holds flow.pt and hift.pt)") from err
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a state dict file"
        raise ValueError(f"{path}: not a state dict readable with torch.load(weights_only=True): {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors")
    return state


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weight_g`/`weight_v` (torch.nn.utils.weight_norm, dim 0) or the parametrisation keys -> `weight`."""
    out: dict[str, torch.Tensor] = {}
    pairs = {".weight_g": ".weight_v", ".parametrizations.weight.original0": ".parametrizations.weight.original1"}
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
        raise ValueError(f"{path}: does not match config.yaml: {len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, config.yaml gives "
                             f"{tuple(expected[key].shape)}")
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- the decoder
class SpeechDecoder:
    """Shared, stateless after load. One `DecoderStream` per reply."""

    def __init__(self, cfg: DecoderConfig, flow: FlowModel, hift: HiftGenerator, device: torch.device,
                 dtype: torch.dtype):
        self.cfg, self.flow, self.hift = cfg, flow, hift
        self.device, self.dtype = device, dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> SpeechDecoder:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{path}: not a directory (expected glm-4-voice-decoder/ with config.yaml, flow.pt, hift.pt)")
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

    def check_tokens(self, tokens: list[int]) -> list[int]:
        out = []
        for i, tok in enumerate(tokens):
            if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)):
                raise ValueError(f"speech token {i} is {tok!r}, not an int")
            if not 0 <= int(tok) < self.num_tokens:
                raise ValueError(f"speech token {i} is {int(tok)}, outside 0..{self.num_tokens - 1}")
            out.append(int(tok))
        return out

    def stream(self, schedule: tuple[int, ...] = (10, 20), legacy_prompt: bool = False, seed: int | None = None,
               draws: Draws | None = None, cache_encoder: bool = True,
               max_prompt_tokens: int | None = None) -> DecoderStream:
        """A reply's stream. `schedule`: tokens per block, the last repeating (first 10: the paper; the
        current official demo uses (25, 50, 100, 150, 200)). `legacy_prompt`: feed back the official
        demo's prompt mel with its duplicated seam frame. `seed`: None = the official seed-42 recipe per
        block; an int = a stream generator seeded once. `draws` overrides both (tests inject here).
        `cache_encoder`: reuse the encodings of complete 10-token blocks (same output up to float
        rounding). `max_prompt_tokens`: opt-in bound on the prompt the estimator sees (changes output)."""
        from pipeline.decoder_stream import DecoderStream, StreamSettings

        if draws is None:
            sines, bins = self.cfg.hift.nb_harmonics + 1, self.cfg.flow.mel_bins
            draws = OfficialDraws(self.device, bins, sines) if seed is None else SeededDraws(self.device, seed, bins)
        settings = StreamSettings.build(schedule, legacy_prompt, cache_encoder, max_prompt_tokens, self.cfg)
        return DecoderStream(self, settings, draws)

    def synthesize(self, tokens: list[int], draws: Draws | None = None, seed: int | None = None) -> np.ndarray:
        """One finalising call over all tokens (`offline_inference`): float32 audio at 22.05 kHz."""
        stream = self.stream(draws=draws, seed=seed, cache_encoder=False)
        return stream.decode_block(tokens, finalize=True).audio


def write_random_checkpoint(out_dir: str | Path, *, vocab_size: int = 16384, d_model: int = 32,
                            num_layers: int = 1, num_heads: int = 2, ffn_dim: int = 64,
                            estimator_channels: int = 16, estimator_blocks: int = 1, mid_blocks: int = 1,
                            estimator_heads: int = 2, head_dim: int = 8, hift_channels: int = 16,
                            harmonics: int = 1, seed: int = 0) -> None:
    """Write a tiny random decoder in the official format (config.yaml with HyperPyYAML tags, flow.pt,
    hift.pt with old-style weight-norm keys). Used for demo weights and tests."""
    from pipeline.decoder_checkpoint import random_checkpoint_files

    random_checkpoint_files(Path(out_dir), vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
                            num_heads=num_heads, ffn_dim=ffn_dim, estimator_channels=estimator_channels,
                            estimator_blocks=estimator_blocks, mid_blocks=mid_blocks,
                            estimator_heads=estimator_heads, head_dim=head_dim, hift_channels=hift_channels,
                            harmonics=harmonics, seed=seed)


if TYPE_CHECKING:
    from pipeline.decoder_stream import DecoderStream

"""Which weights the engine loads (demo or real), on which device, in which dtype.

Resolution order, from the `[model]` settings (any object with the fields of `WeightsSettings`; the engine
passes its `EngineConfig`, so this layer never imports the engine):
1. `tokenizer_dir` / `lm_dir` / `decoder_dir` when set, else `weights_dir/glm-4-voice-{tokenizer,9b,decoder}`
   when `weights_dir` is set: real weights; every folder must hold its checkpoint files.
2. Nothing configured: `require_weights` -> refuse to start; otherwise the demo weights in
   `demo_weights_dir` (written on first start by `pipeline.weights.demo`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from pipeline.transcription.config import TranscriptionConfig

log = logging.getLogger(__name__)

STAGE_FOLDERS = {
    "tokenizer": "glm-4-voice-tokenizer",
    "lm": "glm-4-voice-9b",
    "decoder": "glm-4-voice-decoder",
}
# Files whose presence marks a complete checkpoint folder (the official layouts).
REQUIRED_FILES = {
    "tokenizer": ("config.json", "preprocessor_config.json"),
    "lm": ("config.json", "tokenizer.model", "tokenizer_config.json"),
    "decoder": ("config.yaml", "flow.pt", "hift.pt"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Above this many LM parameters a CPU cannot generate 12.5 speech tokens/s (the 9B needs ~19 GB/token read).
CPU_REALTIME_MAX_LM_PARAMS = 1_000_000_000


class WeightsSettings(Protocol):
    """The `[model]` settings that choose the weights (docs/configuration.md); read-only."""

    @property
    def weights_dir(self) -> str: ...  # holds glm-4-voice-{tokenizer,9b,decoder}/; "" = none
    @property
    def tokenizer_dir(self) -> str: ...  # "" = weights_dir/glm-4-voice-tokenizer
    @property
    def lm_dir(self) -> str: ...  # "" = weights_dir/glm-4-voice-9b
    @property
    def decoder_dir(self) -> str: ...  # "" = weights_dir/glm-4-voice-decoder
    @property
    def demo_weights_dir(self) -> str: ...
    @property
    def require_weights(self) -> bool: ...
    @property
    def device(self) -> str: ...  # "auto" | "cpu" | "cuda" | "cuda:N"
    @property
    def dtype(self) -> str: ...  # "auto" | a key of DTYPES
    @property
    def quantization(self) -> str: ...  # "" | "int4"


class WeightsError(ValueError):
    """The configured weights are missing or incomplete; the message names the folder and file."""


@dataclass(frozen=True)
class ResolvedWeights:
    kind: str  # "demo" | "real"
    tokenizer_dir: Path
    lm_dir: Path
    decoder_dir: Path
    device: torch.device
    lm_dtype: torch.dtype  # the LM runs in this dtype (bf16 on GPU like the official server)
    tokenizer_dtype: torch.dtype  # float32: its tokens in bf16 differ from fp32 (docs/speech_tokenizer.md)
    decoder_dtype: torch.dtype  # bf16 on CUDA (1.5x faster first block, mel 0.8-1.8 % from fp32), fp32 on CPU
    quantization: str  # "" | "int4"

    def describe(self) -> dict:
        """For /health and ResponderInfo.details."""
        return {
            "weights": self.kind,
            "device": str(self.device),
            "dtype": str(self.lm_dtype).removeprefix("torch."),
            "quantization": self.quantization or "none",
            "tokenizer_dir": str(self.tokenizer_dir),
            "lm_dir": str(self.lm_dir),
            "decoder_dir": str(self.decoder_dir),
        }


def select_device(name: str) -> torch.device:
    """`auto` picks CUDA when available; an explicit CUDA device must exist."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WeightsError(f"[model] device = {name!r} but torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device(
            "cuda", 0
        )  # an explicit index: torch.cuda.set_device in the engine thread needs one
    return device


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPU (the checkpoint's torch_dtype), float32 on CPU (bf16 matmuls are slow
    there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise WeightsError(f"[model] dtype = {name!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_folder(stage: str, folder: Path) -> None:
    if not folder.is_dir():
        raise WeightsError(
            f"{stage} weights folder {folder} does not exist "
            "(run `glm4voice download --dir DIR` and set [model] weights_dir = DIR)"
        )
    missing = [name for name in REQUIRED_FILES[stage] if not (folder / name).is_file()]
    if stage == "tokenizer" and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("model.safetensors")
    if stage == "lm" and not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise WeightsError(f"{stage} weights folder {folder} is incomplete: missing {', '.join(missing)}")


def configured_dirs(cfg: WeightsSettings) -> dict[str, Path] | None:
    """The real-weights folders the config names, or None when it names none."""
    overrides = {"tokenizer": cfg.tokenizer_dir, "lm": cfg.lm_dir, "decoder": cfg.decoder_dir}
    if not cfg.weights_dir and not any(overrides.values()):
        return None
    dirs = {}
    for stage, override in overrides.items():
        if override:
            dirs[stage] = Path(override).expanduser()
        elif cfg.weights_dir:
            dirs[stage] = Path(cfg.weights_dir).expanduser() / STAGE_FOLDERS[stage]
        else:
            raise WeightsError(
                f"[model] sets some stage folders but not {stage}_dir, and weights_dir is empty"
            )
    return dirs


def decoder_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA: the first block in 52 ms instead of 78 ms and later blocks 2.2x faster (H200,
    docs/gpu.md) for a mel 0.8-1.8 % (rms) from fp32 (docs/decoder.md, Precision); float32 on CPUs (bf16
    convolutions crawl)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_weights(cfg: WeightsSettings) -> ResolvedWeights:
    """Pick demo or real weights, device and dtypes; writes the demo weights when they are needed."""
    device = select_device(cfg.device)
    lm_dtype = select_dtype(cfg.dtype, device)
    if cfg.quantization not in ("", "int4"):
        raise WeightsError(f"[model] quantization = {cfg.quantization!r}: expected '' or 'int4'")
    if cfg.quantization == "int4" and device.type != "cuda":
        raise WeightsError("[model] quantization = 'int4' needs a CUDA device (bitsandbytes NF4)")
    dirs = configured_dirs(cfg)
    if dirs is None:
        if cfg.require_weights:
            raise WeightsError(
                "require_weights is set but no real weights are configured: run "
                "`glm4voice download --dir DIR` and set [model] weights_dir = DIR "
                "(or GLM4VOICE_MODEL_WEIGHTS_DIR=DIR)"
            )
        from pipeline.weights.demo import ensure_demo_weights

        root = ensure_demo_weights(Path(cfg.demo_weights_dir))
        dirs = {stage: root / folder for stage, folder in STAGE_FOLDERS.items()}
        kind = "demo"
        log.warning(
            "DEMO WEIGHTS: no real GLM-4-Voice weights configured; using tiny random models from %s. "
            "Replies are scripted noise-like babble, the plumbing is real. Run `glm4voice download` "
            "and set [model] weights_dir for the real model.",
            root,
        )
    else:
        kind = "real"
    for stage, folder in dirs.items():
        check_folder(stage, folder)
    return ResolvedWeights(
        kind=kind,
        tokenizer_dir=dirs["tokenizer"],
        lm_dir=dirs["lm"],
        decoder_dir=dirs["decoder"],
        device=device,
        lm_dtype=lm_dtype,
        tokenizer_dtype=torch.float32,
        decoder_dtype=decoder_dtype(device),
        quantization=cfg.quantization,
    )


def warn_if_not_realtime(num_lm_params: int, weights: ResolvedWeights) -> str | None:
    """A warning (also logged) when this LM on this device cannot keep up with real time."""
    if weights.device.type == "cpu" and num_lm_params > CPU_REALTIME_MAX_LM_PARAMS:
        message = (
            f"the LM has {num_lm_params / 1e9:.1f} B parameters and runs on the CPU: it cannot generate "
            "12.5 speech tokens/s, so replies will stutter (not real time). Use a CUDA GPU "
            "([model] device = 'cuda'), int4 on a small GPU, or the demo weights for a plumbing check."
        )
        log.warning(message)
        return message
    return None


@dataclass(frozen=True)
class ResolvedTranscription:
    folder: Path  # a Whisper checkpoint in the transformers format
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> dict:
        return {
            "model": self.folder.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def resolve_transcription(
    cfg: TranscriptionConfig, engine: WeightsSettings, weights: ResolvedWeights
) -> ResolvedTranscription | None:
    """The Whisper checkpoint to load, or None when transcription is off. `model` is a folder, or a repo id
    found as `weights_dir/<repo name>` (where `glm4voice download` puts it); demo weights bring their own."""
    cfg.check()
    if not cfg.wanted(weights.kind == "real"):
        return None
    named = Path(cfg.model).expanduser()
    candidates = [named]
    if engine.weights_dir:
        candidates.append(Path(engine.weights_dir).expanduser() / cfg.model.rstrip("/").split("/")[-1])
    if weights.kind == "demo":
        from pipeline.weights.random_whisper import DEMO_FOLDER

        candidates.append(weights.tokenizer_dir.parent / DEMO_FOLDER)
    folder = next((c for c in candidates if (c / "config.json").is_file()), None)
    if folder is None and cfg.enabled == "auto":  # wanted by default, not asked for: serve without it
        log.warning(
            "[transcription] no Whisper checkpoint at %s: user transcripts are off. "
            "`glm4voice download --dir DIR` fetches it; enabled = 'off' silences this warning",
            ", ".join(map(str, candidates)),
        )
        return None
    if folder is None:
        raise WeightsError(
            f"[transcription] model = {cfg.model!r}: no Whisper checkpoint at "
            f"{', '.join(map(str, candidates))}. "
            "Run `glm4voice download --dir DIR` (it fetches the default beside the GLM-4-Voice checkpoints), "
            "set [transcription] model to a folder, or enabled = 'off'"
        )
    device = select_device(cfg.device) if cfg.device else weights.device
    if cfg.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[cfg.dtype]
    return ResolvedTranscription(folder, device, dtype)

"""Random speech tokenizers in the official `glm-4-voice-tokenizer` format (demo weights, tests, bench).

Every official key is written (the EMA buffers and `embed_positions2` included); sizes are free.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.tokenizer.tokenizer import SpeechTokenizer
from pipeline.tokenizer.whisper_vq import SpeechTokenizerConfig, WhisperVQEncoder

PREPROCESSOR_CONFIG = {  # glm-4-voice-tokenizer's preprocessor_config.json (docs/speech_tokenizer.md)
    "chunk_length": 30,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "processor_class": "WhisperProcessor",
    "return_attention_mask": False,
    "sampling_rate": 16000,
}


def config_json(
    d_model: int, num_layers: int, num_heads: int, ffn_dim: int, codebook_size: int, block_size_frames: int
) -> dict:
    """config.json with the official field list (docs/speech_tokenizer.md); sizes from the arguments."""
    return {
        "activation_dropout": 0.0,
        "activation_function": "gelu",
        "apply_spec_augment": False,
        "architectures": ["WhisperVQEncoder"],
        "attention_dropout": 0.0,
        "begin_suppress_tokens": [220, 50257],
        "bos_token_id": 50257,
        "classifier_proj_size": 256,
        "d_model": d_model,
        "decoder_attention_heads": num_heads,
        "decoder_ffn_dim": ffn_dim,
        "decoder_layerdrop": 0.0,
        "decoder_layers": 2 * num_layers,
        "decoder_start_token_id": 50258,
        "dropout": 0.0,
        "encoder_attention_heads": num_heads,
        "encoder_causal_attention": False,
        "encoder_causal_convolution": True,
        "encoder_ffn_dim": ffn_dim,
        "encoder_layerdrop": 0.0,
        "encoder_layers": 2 * num_layers,
        "eos_token_id": 50257,
        "init_std": 0.02,
        "is_encoder_decoder": True,
        "mask_feature_length": 10,
        "mask_feature_min_masks": 0,
        "mask_feature_prob": 0.0,
        "mask_time_length": 10,
        "mask_time_min_masks": 2,
        "mask_time_prob": 0.05,
        "max_length": 448,
        "max_source_positions": 1500,
        "max_target_positions": 448,
        "median_filter_width": 7,
        "model_type": "whisper",
        "num_hidden_layers": 2 * num_layers,
        "num_mel_bins": 128,
        "pad_token_id": 50256,
        "pooling_kernel_size": 4,
        "pooling_position": num_layers,
        "pooling_type": "avg",
        "quantize_causal_block_size": block_size_frames,
        "quantize_causal_encoder": False,
        "quantize_commit_coefficient": 0.25,
        "quantize_ema_decay": 0.99,
        "quantize_encoder_only": True,
        "quantize_loss_scale": 10.0,
        "quantize_position": num_layers,
        "quantize_restart_interval": 100,
        "quantize_vocab_size": codebook_size,
        "scale_embedding": False,
        "skip_language_detection": True,
        "torch_dtype": "float32",
        "transformers_version": "4.44.1",
        "use_cache": True,
        "use_weighted_layer_sum": False,
        "vocab_size": 51866,
    }


def random_weights(model: WhisperVQEncoder, generator: torch.Generator) -> None:
    """Seeded random values on the scale of a trained model (the parity fixture's recipe)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            elif name.startswith("embed_positions"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)


def calibration_audio(seconds: float, sample_rate_hz: int, rng: np.random.Generator) -> np.ndarray:
    """Speech-like test signal: voiced harmonics with a wandering pitch, noise bursts and pauses."""
    t = np.arange(int(seconds * sample_rate_hz)) / sample_rate_hz
    f0 = (
        120.0
        + 60.0 * np.sin(2 * np.pi * 0.7 * t)
        + 20.0 * rng.standard_normal() * np.sin(2 * np.pi * 3.1 * t)
    )
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate_hz
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    noise = rng.standard_normal(t.size)
    gate = (np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6)) > -0.3).astype(np.float64)
    mix = np.where(np.sin(2 * np.pi * 0.4 * t) > 0.6, 0.3 * noise, voiced)
    return (0.2 * gate * mix).astype(np.float32)


def write_random_checkpoint(
    out_dir: str | Path,
    *,
    d_model: int,
    num_layers: int,
    num_heads: int,
    ffn_dim: int,
    codebook_size: int,
    block_size_frames: int,
    seed: int,
) -> None:
    """Write a random tokenizer in the official format: config.json, preprocessor_config.json and
    model.safetensors with every official key (incl. the EMA buffers and embed_positions2).

    Weights follow the parity fixture's recipe; the codebook is drawn around the pooled hidden states of a
    seeded speech-like signal so that the random model still spreads its tokens over many codes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps(
            config_json(d_model, num_layers, num_heads, ffn_dim, codebook_size, block_size_frames), indent=2
        )
        + "\n"
    )
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    config = SpeechTokenizerConfig.from_dir(out)
    generator = torch.Generator().manual_seed(seed)
    encoder = WhisperVQEncoder(config).eval()
    random_weights(encoder, generator)
    tokenizer = SpeechTokenizer(config, encoder, torch.device("cpu"))
    audio = calibration_audio(6.0, config.mel.sample_rate_hz, np.random.default_rng(seed))
    with torch.inference_mode():
        feats = tokenizer.features(audio)[0][None]  # (1, n_mels, F)
        x = encoder.embed(feats, True, 0)
        h = encoder.encode_block(
            x, encoder.new_cache(), 0, x.shape[1]
        )  # one attention block: enough for a scale
        pooled = h[0].view(-1, config.pool_frames, d_model).mean(1)  # (tokens, d)
    codebook = pooled.mean(0) + pooled.std(0) * torch.randn(codebook_size, d_model, generator=generator)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    state["codebook.weight"] = codebook.contiguous()
    state["embed_positions2.weight"] = 0.5 * torch.randn(
        config.max_positions // config.pool_frames, d_model, generator=generator
    )
    state["ema_count"] = torch.ones(codebook_size)  # training-only buffers, present in the official file
    state["ema_weight"] = codebook.clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

"""Tiny random GLM-4-Voice decoder checkpoints in the official file format (demo weights, tests, bench).

config.yaml follows the official layout and HyperPyYAML tags (the unused `llm` section is left out);
flow.pt is the flow module's state dict; hift.pt stores weight-normed convs as `weight_g`/`weight_v`
as torch 2.3's `weight_norm` did. Sizes are free; the fixed values (80 mel bins, 12.5 Hz tokens,
10-token encoder blocks, CFG 0.7, 22.05 kHz, 256x upsampling) are the release's.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from pipeline.decoder.config import DecoderConfig
from pipeline.decoder.flow import FlowModel
from pipeline.decoder.hift import HiftGenerator
from pipeline.decoder.model import SpeechDecoder

_CONFIG = """\
# Random GLM-4-Voice decoder (pipeline/weights/random_decoder.py, seed {seed}); official layout.
__set_seed1: !apply:random.seed [1986]
sample_rate: 22050
spk_embed_dim: 192

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {d_model}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {vocab_size}
    input_frame_rate: 12.5
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: {d_model}
        attention_heads: {num_heads}
        linear_units: {ffn_dim}
        num_blocks: {num_layers}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: 10
        input_size: {d_model}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1, 1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{estimator_channels}, {estimator_channels}]
            dropout: 0
            attention_head_dim: {head_dim}
            n_blocks: {estimator_blocks}
            num_mid_blocks: {mid_blocks}
            num_heads: {estimator_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: {harmonics}
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {hift_channels}
"""

# hift.pt keys whose convs carry torch.nn.utils.weight_norm in the official module.
_WEIGHT_NORMED = re.compile(
    r"^(conv_pre|conv_post|ups\.\d+|(source_)?resblocks\.\d+\.convs[12]\.\d+|"
    r"f0_predictor\.condnet\.\d+)\.weight$"
)


def unfold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain `weight` -> official `weight_g` (norm over all dims but 0) + `weight_v`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _WEIGHT_NORMED.match(key):
            stem = key[: -len(".weight")]
            out[stem + ".weight_g"] = torch.norm_except_dim(value, 2, 0).clone()
            out[stem + ".weight_v"] = value.clone()
        else:
            out[key] = value.clone()
    return out


def write_random_checkpoint(
    out_dir: str | Path,
    *,
    vocab_size: int = 16384,
    d_model: int = 32,
    num_layers: int = 1,
    num_heads: int = 2,
    ffn_dim: int = 64,
    estimator_channels: int = 16,
    estimator_blocks: int = 1,
    mid_blocks: int = 1,
    estimator_heads: int = 2,
    head_dim: int = 8,
    hift_channels: int = 16,
    harmonics: int = 1,
    seed: int = 0,
) -> None:
    """Write a random decoder in the official format (config.yaml with HyperPyYAML tags, flow.pt,
    hift.pt with old-style weight-norm keys). Default sizes are tiny (demo weights, tests)."""
    out_dir = Path(out_dir)
    if estimator_channels % 8 or hift_channels % 4:
        raise ValueError("estimator_channels must divide into 8 GroupNorm groups; hift_channels by 4")
    out_dir.mkdir(parents=True, exist_ok=True)
    text = _CONFIG.format(
        seed=seed,
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        ffn_dim=ffn_dim,
        estimator_channels=estimator_channels,
        estimator_blocks=estimator_blocks,
        mid_blocks=mid_blocks,
        estimator_heads=estimator_heads,
        head_dim=head_dim,
        hift_channels=hift_channels,
        harmonics=harmonics,
    )
    (out_dir / "config.yaml").write_text(text, encoding="utf-8")
    cfg = DecoderConfig.from_yaml_file(out_dir / "config.yaml")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow, hift = FlowModel(cfg.flow), HiftGenerator(cfg.hift)
        gen = torch.Generator().manual_seed(seed)
        for name, param in flow.named_parameters():
            if name.endswith(("pos_bias_u", "pos_bias_v")):
                param.data = 0.1 * torch.randn(param.shape, generator=gen)
        with torch.no_grad():
            hift.f0_predictor.classifier.weight.mul_(0.1)
            hift.f0_predictor.classifier.bias.fill_(150.0)  # voiced around 150 Hz: a buzz, not hiss
    torch.save(flow.state_dict(), out_dir / "flow.pt")
    torch.save(unfold_weight_norm(hift.state_dict()), out_dir / "hift.pt")


REAL_SIZES = dict(
    vocab_size=16384,
    d_model=512,
    num_layers=6,
    num_heads=8,
    ffn_dim=2048,
    estimator_channels=256,
    estimator_blocks=4,
    mid_blocks=12,
    estimator_heads=8,
    head_dim=64,
    hift_channels=512,
    harmonics=8,
)  # config.yaml of glm-4-voice-decoder (docs/decoder.md)


def random_decoder(*, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, **sizes: int):
    """A SpeechDecoder with random weights built in memory (no files): for benchmarks at real sizes.
    `sizes` are write_random_checkpoint's keywords; missing ones take the release's values."""
    full = {**REAL_SIZES, **sizes}
    text = _CONFIG.format(seed=seed, **full)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(text, encoding="utf-8")
        cfg = DecoderConfig.from_yaml_file(Path(tmp) / "config.yaml")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow, hift = FlowModel(cfg.flow), HiftGenerator(cfg.hift)
        with torch.no_grad():
            hift.f0_predictor.classifier.weight.mul_(0.1)
            hift.f0_predictor.classifier.bias.fill_(150.0)
    flow.to(device=device, dtype=dtype).eval().requires_grad_(False)
    hift.to(device=device, dtype=dtype).eval().requires_grad_(False)
    hift.stft_window = hift.stft_window.float()
    return SpeechDecoder(cfg, flow, hift, torch.device(device), dtype)

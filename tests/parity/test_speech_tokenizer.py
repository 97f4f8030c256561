"""Speech tokenizer: parity with the official outputs, checkpoint loading, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.tokenizer.stream import TokenizerStream
from pipeline.tokenizer.tokenizer import SpeechTokenizer
from pipeline.weights.random_tokenizer import write_random_checkpoint
from tests.helpers.parity import stage_dir

FIXTURE = stage_dir("speech_tokenizer", "cases.json")
# Missing fixtures are a failure, never a skip: a wrong GLM4VOICE_PARITY_DIR must not pass silently.
needs_fixture = pytest.mark.usefixtures("_parity_fixture")


@pytest.fixture
def _parity_fixture() -> None:
    if not (FIXTURE / "cases.json").is_file():
        pytest.fail(f"no speech tokenizer parity fixture at {FIXTURE}: set GLM4VOICE_PARITY_DIR")


def _cases() -> list[dict]:
    if not (FIXTURE / "cases.json").is_file():
        return []
    return json.loads((FIXTURE / "cases.json").read_text())["individual_calls"]


def _wav(case: dict) -> np.ndarray:
    return np.load(FIXTURE / case["wav"]).astype(np.float32) / 32768.0  # the fixture's stated conversion


def _official_features(case: dict) -> np.ndarray:
    path = FIXTURE / case["features_file"]
    return (
        np.load(path)["input_features"] if path.suffix == ".npz" else np.load(path)
    )  # (segments, n_mels, F)


@pytest.fixture(scope="module")
def tokenizer() -> SpeechTokenizer:
    torch.set_num_threads(2)
    return SpeechTokenizer.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    write_random_checkpoint(
        out,
        d_model=48,
        num_layers=2,
        num_heads=2,
        ffn_dim=96,
        codebook_size=256,
        block_size_frames=200,
        seed=7,
    )
    return out


def assert_features_close(ours: np.ndarray, ref: np.ndarray) -> None:
    """Log-mel features (n_mels, frames) equal up to what float32 FFTs of other builds can produce.

    An FFT's rounding error in a bin's power is relative to the whole frame's energy, not to the bin's own
    power, and the log turns it into an absolute feature error that grows as a bin falls below its frame's
    loudest bin (feature units are log10 / 4, so one decade is 0.25). Measured on the fixtures: ~1e-7 in the
    loudest decade on every machine; 6e-8 at the bottom on Intel (MKL), up to 5.9e-5 seven decades down on AMD
    EPYC (about x2.5 per decade). Bound: 4e-6 * 2.5**decades (>= 8x margin at every depth); bins clamped at
    the floor (8 decades below the segment's max) are exact on both. Tokens, what the model sees, stay exact.
    """
    assert ours.shape == ref.shape
    decades = 4.0 * (ref.max(axis=0, keepdims=True) - ref)  # how far below its frame's loudest bin
    bound = 4e-6 * 2.5**decades
    worst = np.abs(ours - ref) / bound
    assert worst.max() <= 1.0, (
        f"feature error {float(np.abs(ours - ref).max()):.2e} passes the bound at "
        f"{np.unravel_index(worst.argmax(), worst.shape)}"
    )


@needs_fixture
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_parity_tokens(tokenizer: SpeechTokenizer, case: dict) -> None:
    assert tokenizer.tokenize(_wav(case)) == case["tokens"]


@needs_fixture
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_parity_features(tokenizer: SpeechTokenizer, case: dict) -> None:
    official = _official_features(case)
    ours = tokenizer.features(_wav(case))
    assert len(ours) == official.shape[0] == case["num_30s_segments"]
    for seg, ref in zip(ours, official, strict=True):
        # The official batch pads every segment to the longest one; the padding frames do not reach the
        # model's valid tokens, so compare the frames of our own (unpadded-batch) segment.
        assert_features_close(seg.numpy(), ref[:, : seg.shape[1]])


@needs_fixture
def test_parity_batched_call(tokenizer: SpeechTokenizer) -> None:
    batched = json.loads((FIXTURE / "cases.json").read_text())["batched_call"]
    by_name = {c["name"]: c for c in _cases()}
    wavs = [_wav(by_name[name]) for name in batched["utterances"]]
    assert tokenizer.tokenize_batch(wavs) == batched["tokens"]


@needs_fixture
def test_features_match_transformers_extractor(tokenizer: SpeechTokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor.from_pretrained(FIXTURE)
    wav = _wav(_cases()[0])
    ref = fe(
        wav,
        sampling_rate=16000,
        return_tensors="np",
        padding="longest",
        pad_to_multiple_of=1280,
        device="cpu",
    )["input_features"][0]
    assert_features_close(tokenizer.features(wav)[0].numpy(), ref)


def test_config_sizes_come_from_the_checkpoint(tiny_dir: Path) -> None:
    tok = SpeechTokenizer.from_pretrained(tiny_dir)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert tok.config.d_model == cfg["d_model"] == 48
    assert tok.config.num_layers == cfg["quantize_position"] == 2
    assert tok.config.codebook_size == cfg["quantize_vocab_size"] == 256
    assert tok.config.samples_per_token == 1280 and tok.config.block_frames // tok.config.pool_frames == 50


def test_random_checkpoint_has_official_keys_and_spreads_tokens(tiny_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("ema_weight").shape == (256, 48) and f.get_tensor("ema_count").shape == (256,)
    assert {
        "conv1.weight",
        "conv2.bias",
        "embed_positions.weight",
        "embed_positions2.weight",
        "codebook.weight",
        "layers.1.self_attn.k_proj.weight",
        "layers.1.final_layer_norm.bias",
    } <= keys
    assert "layers.0.self_attn.k_proj.bias" not in keys  # Whisper's k_proj has no bias
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(32000) * np.sin(np.linspace(0, 40, 32000)) ** 2).astype(np.float32)
    tokens = SpeechTokenizer.from_pretrained(tiny_dir).tokenize(wav)
    assert len(tokens) == 25 and len(set(tokens)) > 5


def test_sharded_checkpoint_gives_same_tokens(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_dir / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    wav = np.random.default_rng(1).uniform(-0.3, 0.3, 24000).astype(np.float32)
    assert SpeechTokenizer.from_pretrained(tmp_path).tokenize(wav) == SpeechTokenizer.from_pretrained(
        tiny_dir
    ).tokenize(wav)


def _copy_without(src: Path, dst: Path, drop: str) -> None:
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name != drop:
            shutil.copy(f, dst / f.name)


@pytest.mark.parametrize("missing", ["config.json", "preprocessor_config.json", "model.safetensors"])
def test_missing_file_is_named(tiny_dir: Path, tmp_path: Path, missing: str) -> None:
    _copy_without(tiny_dir, tmp_path / "ckpt", missing)
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        SpeechTokenizer.from_pretrained(tmp_path / "ckpt")


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SpeechTokenizer.from_pretrained(tmp_path / "nowhere")


def test_missing_key_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _copy_without(tiny_dir, tmp_path, "model.safetensors")
    state = load_file(tiny_dir / "model.safetensors")
    del state["layers.1.fc2.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.fc2\.weight.*model\.safetensors"):
        SpeechTokenizer.from_pretrained(tmp_path)


def test_shape_mismatch_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _copy_without(tiny_dir, tmp_path, "model.safetensors")
    state = load_file(tiny_dir / "model.safetensors")
    state["codebook.weight"] = torch.zeros(100, 48)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"codebook\.weight.*\(100, 48\).*\(256, 48\)"):
        SpeechTokenizer.from_pretrained(tmp_path)


def test_ema_buffers_are_ignored(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _copy_without(tiny_dir, tmp_path, "model.safetensors")
    state = load_file(tiny_dir / "model.safetensors")
    state["ema_weight"] = torch.full_like(state["ema_weight"], float("nan"))
    save_file(state, str(tmp_path / "model.safetensors"))
    wav = np.random.default_rng(2).uniform(-0.3, 0.3, 16000).astype(np.float32)
    assert SpeechTokenizer.from_pretrained(tmp_path).tokenize(wav) == SpeechTokenizer.from_pretrained(
        tiny_dir
    ).tokenize(wav)


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> SpeechTokenizer:
    return SpeechTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(3).uniform(-0.5, 0.5, 20000).astype(np.float32)


def test_empty_audio_gives_no_tokens(tiny: SpeechTokenizer) -> None:
    assert tiny.tokenize(np.zeros(0, dtype=np.float32)) == []
    stream = TokenizerStream(tiny)
    assert stream.push(np.zeros(0, dtype=np.float32)) == [] and stream.flush() == [] and stream.tokens == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_audio_is_rejected(tiny: SpeechTokenizer, noise: np.ndarray, bad: float) -> None:
    wav = noise.copy()
    wav[123] = bad
    with pytest.raises(ValueError, match="NaN/Inf.*index 123"):
        tiny.tokenize(wav)
    with pytest.raises(ValueError, match="NaN/Inf"):
        TokenizerStream(tiny).push(wav)


def test_int16_is_scaled_like_the_official_loader(tiny: SpeechTokenizer, noise: np.ndarray) -> None:
    pcm = (noise * 32767).astype(np.int16)
    assert tiny.tokenize(pcm) == tiny.tokenize(pcm.astype(np.float32) / 32768.0)


def test_float64_and_single_channel_2d_are_accepted(tiny: SpeechTokenizer, noise: np.ndarray) -> None:
    ref = tiny.tokenize(noise)
    assert tiny.tokenize(noise.astype(np.float64)) == ref
    assert tiny.tokenize(noise[None, :]) == ref and tiny.tokenize(noise[:, None]) == ref


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 16000), np.float32),
        np.zeros((16000, 2), np.float32),
        np.zeros((1, 2, 100), np.float32),
        np.array(0.5, np.float32),
    ],
)
def test_multichannel_or_wrong_rank_is_rejected(tiny: SpeechTokenizer, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="mono"):
        tiny.tokenize(bad)


@pytest.mark.parametrize("bad", [np.zeros(100, np.uint8), np.zeros(100, np.complex64), np.zeros(100, bool)])
def test_unsupported_dtype_is_rejected(tiny: SpeechTokenizer, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="dtype"):
        tiny.tokenize(bad)


def test_non_array_is_rejected(tiny: SpeechTokenizer) -> None:
    with pytest.raises(TypeError, match="numpy array"):
        tiny.tokenize([0.0] * 100)  # type: ignore[arg-type]


def test_other_sample_rates_are_resampled_with_soxr(tiny: SpeechTokenizer, noise: np.ndarray) -> None:
    import soxr

    wav_8k = noise[::2].copy()
    expected = tiny.tokenize(soxr.resample(wav_8k, 8000, 16000, quality="HQ").astype(np.float32))
    assert tiny.tokenize(wav_8k, sample_rate_hz=8000) == expected
    assert len(expected) == -(-len(wav_8k) * 2 // 1280)
    with pytest.raises(ValueError, match="positive"):
        tiny.tokenize(noise, sample_rate_hz=0)
    with pytest.raises(ValueError, match="mono"):
        TokenizerStream(tiny).push(np.zeros((2, 10), np.float32))  # stereo to the stream: rejected too


def test_bfloat16_path_runs_with_float32_distances(tiny_dir: Path, noise: np.ndarray) -> None:
    tok = SpeechTokenizer.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert (
        tok.encoder.codebook.weight.dtype == torch.float32
        and tok.encoder.conv1.weight.dtype == torch.bfloat16
    )
    ref = SpeechTokenizer.from_pretrained(tiny_dir).tokenize(noise)
    got = tok.tokenize(noise)
    assert len(got) == len(ref) and all(0 <= t < tok.config.codebook_size for t in got)
    with pytest.raises(ValueError, match="dtype"):
        SpeechTokenizer.from_pretrained(tiny_dir, dtype=torch.int8)


@needs_fixture
@pytest.mark.parametrize("n_samples", [1, 201, 1281, 63879, 63880, 480001])
def test_edge_lengths_features_tokens_and_stream(tokenizer: SpeechTokenizer, n_samples: int) -> None:
    """Lengths at the reflect-pad, token, block and segment boundaries: features as transformers' extractor
    computes them, ceil(N / 1280) tokens per segment, and a randomly chunked stream equal to tokenize()."""
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor.from_pretrained(FIXTURE)
    rng = np.random.default_rng(n_samples)
    wav = (rng.uniform(-0.3, 0.3, n_samples) * np.sin(np.arange(n_samples) / 3000.0) ** 2).astype(np.float32)
    seg_samples = tokenizer.config.mel.segment_samples
    ref = fe(
        wav[:seg_samples],
        sampling_rate=16000,
        return_tensors="np",
        padding="longest",
        pad_to_multiple_of=tokenizer.config.samples_per_token,
        device="cpu",
    )["input_features"][0]
    assert_features_close(tokenizer.features(wav)[0].numpy(), ref)
    tokens = tokenizer.tokenize(wav)
    spt = tokenizer.config.samples_per_token
    assert len(tokens) == sum(
        -(-len(wav[s : s + seg_samples]) // spt) for s in range(0, n_samples, seg_samples)
    )
    stream, streamed, pos = TokenizerStream(tokenizer), [], 0
    while pos < n_samples:
        size = int(rng.integers(1, 20000))
        streamed += stream.push(wav[pos : pos + size])
        pos += size
    assert streamed + stream.flush() == stream.tokens == tokens

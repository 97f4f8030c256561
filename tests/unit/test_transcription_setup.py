"""The `[transcription]` settings, the Whisper checkpoint they resolve to, and the random checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.engine.config import EngineConfig
from pipeline.transcription.config import TranscriptionConfig
from pipeline.weights.resolve import ResolvedWeights, WeightsError, resolve_transcription
from server.config import load_config


def weights(kind: str, root: Path) -> ResolvedWeights:
    f32, cpu = torch.float32, torch.device("cpu")
    return ResolvedWeights(kind, root / "tok", root / "lm", root / "dec", cpu, f32, f32, f32, "")


def test_settings_from_env_and_their_errors() -> None:
    config = load_config(None, env={"GLM4VOICE_TRANSCRIPTION_ENABLED": "on"})
    assert (
        config.transcription.enabled == "on" and config.transcription.model == "openai/whisper-large-v3-turbo"
    )
    for key, value in [("ENABLED", "maybe"), ("DTYPE", "int8"), ("MODEL", "")]:
        with pytest.raises(ValueError, match=r"\[transcription\]"):
            load_config(None, env={f"GLM4VOICE_TRANSCRIPTION_{key}": value})


def test_on_with_real_weights_off_with_demo_unless_asked(tmp_path) -> None:
    demo, real = weights("demo", tmp_path / "demo"), weights("real", tmp_path)
    assert resolve_transcription(TranscriptionConfig(), EngineConfig(), demo) is None
    assert (
        resolve_transcription(
            TranscriptionConfig(enabled="off"), EngineConfig(weights_dir=str(tmp_path)), real
        )
        is None
    )
    # auto + real weights but no checkpoint: the server still starts, without transcripts
    assert resolve_transcription(TranscriptionConfig(), EngineConfig(weights_dir=str(tmp_path)), real) is None
    with pytest.raises(WeightsError, match="glm4voice download"):  # asked for explicitly: refused
        resolve_transcription(
            TranscriptionConfig(enabled="on"), EngineConfig(weights_dir=str(tmp_path)), real
        )
    fetched = tmp_path / "whisper-large-v3-turbo"  # where `glm4voice download` puts the default
    fetched.mkdir()
    (fetched / "config.json").write_text("{}")
    found = resolve_transcription(
        TranscriptionConfig(dtype="bfloat16"), EngineConfig(weights_dir=str(tmp_path)), real
    )
    assert found.folder == fetched and found.device == torch.device("cpu") and found.dtype == torch.bfloat16
    mine = resolve_transcription(TranscriptionConfig(enabled="on", model=str(fetched)), EngineConfig(), demo)
    assert mine.folder == fetched and mine.dtype == torch.float32  # a folder wins, also on demo weights


def test_random_checkpoint_loads_with_transformers_and_transcribes(tmp_path) -> None:
    from transformers import WhisperProcessor

    from pipeline.transcription.model import Whisper
    from pipeline.weights.random_whisper import special_tokens, write_random_checkpoint

    folder = write_random_checkpoint(tmp_path / "w", seed=1)
    tok = WhisperProcessor.from_pretrained(folder).tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in special_tokens()]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # Whisper's order, right after the text tokens
    assert tok.decode(tok.encode(" hello 你好", add_special_tokens=False)) == " hello 你好"
    model = Whisper.from_pretrained(folder, torch.device("cpu"), torch.float32)
    pieces: list[str] = []
    pcm = np.random.default_rng(0).standard_normal(16000 * 31).astype(np.float32) * 0.1  # two 30 s windows
    result = model.transcribe(pcm, language="en", prompt="names: Zhipu", on_text=pieces.append)
    assert result.language == "en" and result.audio_ms == pytest.approx(31000.0)
    assert (
        pieces
        and pieces[-1] == result.text
        and all(b.startswith(a) for a, b in zip(pieces, pieces[1:], strict=False))
    )
    with pytest.raises(ValueError, match="language"):
        model.transcribe(pcm[:16000], language="klingon")

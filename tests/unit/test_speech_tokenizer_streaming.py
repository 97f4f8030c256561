"""Streaming speech tokenizer: block-final push, exact flush, rollback report, on real espeak-ng speech."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.tokenizer.stream import TokenizerStream
from pipeline.tokenizer.tokenizer import SpeechTokenizer
from pipeline.weights.random_tokenizer import write_random_checkpoint
from tests.helpers.parity import stage_dir
from tests.helpers.speech import ENGLISH_SENTENCES, MANDARIN_PINYIN, have_speech_tools, synth_speech

FIXTURE = stage_dir("speech_tokenizer", "cases.json")
PUSH_SAMPLES = 320  # 20 ms at 16 kHz, the WebRTC frame size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SpeechTokenizer:
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("tok")
    write_random_checkpoint(
        out,
        d_model=64,
        num_layers=2,
        num_heads=2,
        ffn_dim=128,
        codebook_size=1024,
        block_size_frames=200,
        seed=5,
    )
    return SpeechTokenizer.from_pretrained(out)


def _stream(
    tok: SpeechTokenizer, wav: np.ndarray, sizes: list[int] | None = None, refresh: bool = True
) -> tuple[list[int], list[int], object]:
    """Push `wav` in pieces; returns (tokens returned by push, tokens returned by flush, the stream)."""
    stream = TokenizerStream(tok, refresh)
    pushed, pos, i = [], 0, 0
    while pos < len(wav):
        n = sizes[i % len(sizes)] if sizes else PUSH_SAMPLES
        pushed += stream.push(wav[pos : pos + n])
        pos, i = pos + n, i + 1
    return pushed, stream.flush(), stream


def _block_ready_samples(tok: SpeechTokenizer, block: int) -> int:
    """Samples of a segment after which block `block` is complete: its last mel frame's window is all in."""
    c = tok.config
    last_mel_frame = 2 * c.block_frames * (block + 1) - 2  # frame 2j feeds encoder frame j (causal convs)
    return last_mel_frame * c.mel.hop_samples + c.mel.n_fft // 2


def test_stream_gives_the_official_tokens() -> None:
    tok = SpeechTokenizer.from_pretrained(FIXTURE)
    for case in json.loads((FIXTURE / "cases.json").read_text())["individual_calls"]:
        wav = np.load(FIXTURE / case["wav"]).astype(np.float32) / 32768.0
        pushed, rest, stream = _stream(tok, wav, sizes=[1, 317, 4000, 999, 20000])
        assert pushed + rest == stream.tokens == case["tokens"], case["name"]


def test_push_returns_a_block_exactly_when_its_audio_is_complete(tiny: SpeechTokenizer) -> None:
    wav = np.random.default_rng(0).uniform(-0.3, 0.3, 3 * 64000).astype(np.float32)
    stream = TokenizerStream(tiny)
    per_block = tiny.config.block_frames // tiny.config.pool_frames  # tokens per attention block
    pos = 0
    for block in range(2):
        ready = _block_ready_samples(tiny, block)
        assert stream.push(wav[pos : ready - 1]) == []
        got = stream.push(wav[ready - 1 : ready])
        assert len(got) == per_block
        pos = ready
    stream.push(wav[pos:])
    stream.flush()
    assert stream.tokens == tiny.tokenize(wav)


def test_flush_reuses_blocks_when_the_floor_is_unchanged(tiny: SpeechTokenizer) -> None:
    rng = np.random.default_rng(1)
    loud = rng.uniform(-0.5, 0.5, 70000).astype(np.float32)  # the segment max is in the first block
    wav = np.concatenate([loud, 0.05 * rng.uniform(-0.5, 0.5, 90000).astype(np.float32)])
    pushed, rest, stream = _stream(tiny, wav)
    assert len(pushed) == 2 * (tiny.config.block_frames // tiny.config.pool_frames)  # two whole blocks
    assert stream.blocks_encoded_flush == 1  # only the open last block
    assert stream.first_changed is None and pushed + rest == tiny.tokenize(wav)


def test_floor_rise_at_the_end_is_rolled_back(tiny: SpeechTokenizer) -> None:
    rng = np.random.default_rng(2)
    speech = synth_speech(ENGLISH_SENTENCES[0]) if have_speech_tools() else rng.uniform(-0.3, 0.3, 80000)
    quiet = 0.02 * speech[:64000].astype(np.float32)  # whole first block quiet, pauses clamped at its floor
    wav = np.concatenate([quiet, speech[:16000].astype(np.float32)])  # loud second in the open block
    pushed, rest, stream = _stream(tiny, wav)
    final = tiny.tokenize(wav)
    assert stream.tokens == final and rest == final[len(pushed) :]
    assert stream.blocks_encoded_flush == 2  # block 0 recomputed under the final floor, then the open block
    first_diff = next((i for i, (a, b) in enumerate(zip(pushed, final, strict=False)) if a != b), None)
    assert first_diff is not None and stream.first_changed == first_diff


def test_segment_is_settled_at_30_s_before_flush(tiny: SpeechTokenizer) -> None:
    seg_samples = tiny.config.mel.segment_samples
    wav = np.random.default_rng(3).uniform(-0.3, 0.3, seg_samples + 5000).astype(np.float32)
    stream = TokenizerStream(tiny)
    pushed = stream.push(wav[:seg_samples])
    assert pushed == tiny.tokenize(wav[:seg_samples])  # the whole first segment, exact
    stream.push(wav[seg_samples:])
    stream.flush()
    assert stream.tokens == tiny.tokenize(wav)


def test_stream_lifecycle(tiny: SpeechTokenizer) -> None:
    wav = np.random.default_rng(4).uniform(-0.3, 0.3, 30000).astype(np.float32)
    stream = TokenizerStream(tiny)
    stream.push(wav)
    first = stream.flush()
    assert stream.flush() == [] and stream.tokens == first == tiny.tokenize(wav)
    with pytest.raises(RuntimeError, match="reset"):
        stream.push(wav)
    stream.reset()
    assert stream.tokens == [] and stream.first_changed is None
    stream.push((wav * 32767).astype(np.int16))  # int16 is converted as in tokenize()
    stream.flush()
    assert stream.tokens == tiny.tokenize((wav * 32767).astype(np.int16))


def _turns() -> dict[str, np.ndarray]:
    en = [synth_speech(s) for s in ENGLISH_SENTENCES]
    zh = [synth_speech(s, voice="cmn-latn-pinyin") for s in MANDARIN_PINYIN]
    rng = np.random.default_rng(0)

    def join(parts: list[np.ndarray], gains: bool = False) -> np.ndarray:
        pause = np.zeros(8000, np.float32)
        return np.concatenate(
            [x for p in parts for x in (p * (rng.uniform(0.2, 1.0) if gains else 1.0), pause)]
        )

    turns = {f"en{i}": join([w]) for i, w in enumerate(en)} | {f"zh{i}": join([w]) for i, w in enumerate(zh)}
    turns["en+zh"] = join([en[0], zh[0], en[1]])
    turns["long (>30 s)"] = join(en + zh + en + zh)
    turns["en, varying level"] = join(en + en, gains=True)
    turns["zh, varying level"] = join(zh + zh, gains=True)
    turns["long, varying level"] = join(en + zh + en + zh, gains=True)
    return turns


@pytest.mark.skipif(not have_speech_tools(), reason="espeak-ng and sox required")
@pytest.mark.parametrize("refresh", [True, False])
def test_streamed_vs_offline_on_real_speech(tiny: SpeechTokenizer, refresh: bool) -> None:
    """The question is the streaming logic, so a random model is enough: its tokens still depend on the
    features exactly as the real model's do. Prints how many early tokens the exact end-of-turn pass
    changed."""
    turns = _turns()
    assert max(len(w) for w in turns.values()) > tiny.config.mel.segment_samples
    changed_total = streamed_total = turns_changed = 0
    print(
        f"\nrefresh={refresh}: turn, seconds, tokens, returned by push, changed at flush, first_changed, "
        "blocks encoded by push / flush"
    )
    for name, wav in turns.items():
        pushed, rest, stream = _stream(tiny, wav, refresh=refresh)  # 20 ms pushes
        final = tiny.tokenize(wav)
        assert stream.tokens == final and rest == final[len(pushed) :], name
        diffs = [i for i, (a, b) in enumerate(zip(pushed, final, strict=False)) if a != b]
        assert stream.first_changed == (diffs[0] if diffs else None), name
        changed_total, streamed_total = changed_total + len(diffs), streamed_total + len(pushed)
        turns_changed += bool(diffs)
        print(
            f"  {name:20s} {len(wav) / 16000:5.1f} {len(final):4d} {len(pushed):4d} {len(diffs):3d} "
            f"{stream.first_changed!s:>5} {stream.blocks_encoded_push:3d} / {stream.blocks_encoded_flush}"
        )
    print(
        f"  changed {changed_total} of {streamed_total} streamed tokens "
        f"({100 * changed_total / streamed_total:.1f}%); {turns_changed} of {len(turns)} turns rolled back"
    )


def test_reset_frees_the_encoder_cache_and_the_next_turn_is_exact(tiny: SpeechTokenizer) -> None:
    wav = np.random.default_rng(5).uniform(-0.3, 0.3, 2 * 64000).astype(np.float32)
    stream = TokenizerStream(tiny)
    stream.push(wav)
    assert stream._seg.kv is not None  # a turn in progress holds its cache
    stream.flush()
    stream.reset()
    assert stream._seg.kv is None  # between turns the call holds no encoder cache
    stream.push(wav)
    stream.flush()
    assert stream.tokens == tiny.tokenize(wav)

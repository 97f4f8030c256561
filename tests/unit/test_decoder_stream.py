"""Decoder on a tiny random checkpoint written by `write_random_checkpoint`: loading, streaming behaviour,
seams, settings and bad input. Parity with the official code is in test_decoder_parity.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.decoder.config import read_config_yaml
from pipeline.decoder.model import SpeechDecoder
from pipeline.decoder.stream import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_SCHEDULE, DecoderStream, synthesize
from pipeline.weights.random_decoder import _WEIGHT_NORMED, write_random_checkpoint


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("decoder")
    write_random_checkpoint(path, vocab_size=512, seed=7)
    return path


@pytest.fixture(scope="module")
def decoder(ckpt_dir: Path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_decoder_parity: 2 threads crawl on a shared 2-core machine
    yield SpeechDecoder.from_pretrained(ckpt_dir)
    torch.set_num_threads(threads)


def _tokens(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _stream_all(stream, tokens: list[int], step: int = 3) -> list[np.ndarray]:
    pieces = [stream.push(tokens[i : i + step]) for i in range(0, len(tokens), step)]
    return pieces + [stream.finish()]


def test_random_checkpoint_is_in_the_official_format(ckpt_dir: Path, decoder: SpeechDecoder) -> None:
    hift = torch.load(ckpt_dir / "hift.pt", weights_only=True)
    assert "conv_pre.weight_g" in hift and "conv_pre.weight_v" in hift and "conv_pre.weight" not in hift
    assert "f0_predictor.condnet.8.weight_v" in hift and "source_downs.0.weight" in hift
    flow = torch.load(ckpt_dir / "flow.pt", weights_only=True)
    assert "decoder.estimator.time_mlp.linear_1.weight" in flow and "encoder.embed.out.0.weight" in flow
    doc = read_config_yaml(ckpt_dir / "config.yaml")
    assert doc["flow"]["_class"] == "cosyvoice.flow.flow.MaskedDiffWithXvec"
    assert doc["hift"]["sampling_rate"] == 22050  # `!ref <sample_rate>` resolved
    # Folding weight_g/weight_v at load gives back the conv weights.
    v, g = hift["conv_pre.weight_v"], hift["conv_pre.weight_g"]
    expect = g * v / v.norm(dim=(1, 2), keepdim=True)
    assert torch.allclose(decoder.hift.conv_pre.weight, expect, atol=1e-6)
    assert all(_WEIGHT_NORMED.match(k[: -len("_g")]) for k in hift if k.endswith("weight_g"))
    assert decoder.num_tokens == 512 and decoder.sample_rate_hz == 22050


def test_yaml_tags_are_read_as_data_never_executed(tmp_path: Path) -> None:
    text = (
        "__x: !apply:builtins.exec ['raise SystemExit(3)']\nn: 4\n"
        "obj: !new:os.system\n    command: 'false'\n    size: !ref <n>\n"
    )
    (tmp_path / "config.yaml").write_text(text)
    doc = read_config_yaml(tmp_path / "config.yaml")
    assert doc["obj"] == {"command": "false", "size": 4, "_class": "os.system"}
    (tmp_path / "config.yaml").write_text("a: !ref <missing>\n")
    with pytest.raises(ValueError, match="names no key"):
        read_config_yaml(tmp_path / "config.yaml")


def test_synthesize_length_and_range(decoder: SpeechDecoder) -> None:
    audio = synthesize(decoder, _tokens(10))
    assert audio.dtype == np.float32 and np.isfinite(audio).all()
    assert len(audio) == decoder.cfg.flow.frames_for(10) * 256
    assert 0 < np.abs(audio).max() <= 0.99


def _join_jumps(pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """|x[n] - x[n-1]| at each block join, and the same jump everywhere else."""
    audio = np.concatenate(pieces)
    joins = np.cumsum([len(p) for p in pieces if len(p)])[:-1]
    jumps = np.abs(np.diff(audio))  # jumps[n - 1] is the jump into sample n
    at_joins = jumps[joins - 1]
    elsewhere = np.delete(jumps, np.concatenate([joins - 1 + k for k in (-1, 0, 1)]))
    return at_joins, elsewhere


def test_stream_length_and_no_clicks_at_block_joins(decoder: SpeechDecoder) -> None:
    tokens = _tokens(95, seed=1)
    stream = DecoderStream(decoder, schedule=(10, 20))
    pieces = _stream_all(stream, tokens)
    assert [len(p) > 0 for p in pieces].count(True) == 6  # 10 + 4 x 20 + final 5
    assert stream.tokens_decoded == len(tokens)
    # With the corrected prompt nothing is lost at the seams: every mel frame of the reply is heard once.
    assert sum(len(p) for p in pieces) == decoder.cfg.flow.frames_for(len(tokens)) * 256
    at_joins, elsewhere = _join_jumps(pieces)
    assert at_joins.max() <= elsewhere.max(), (at_joins, elsewhere.max())
    assert at_joins.max() <= np.percentile(elsewhere, 99)
    # The check does see a click: a step spliced in at the first join is flagged.
    clicked = [pieces[0] if len(pieces[0]) else pieces[3]] + [p + 0.3 for p in pieces[4:] if len(p)]
    assert _join_jumps(clicked)[0].max() > _join_jumps(clicked)[1].max()


def test_push_before_a_full_block_returns_nothing(decoder: SpeechDecoder) -> None:
    stream = DecoderStream(decoder, schedule=(10, 20))
    assert stream.push(_tokens(9)).size == 0 and stream.tokens_decoded == 0
    assert stream.push([]).size == 0
    first = stream.push(_tokens(1, seed=5))
    assert first.size == (decoder.cfg.flow.frames_for(10) - decoder.cfg.mel_overlap_frames - 1) * 256
    assert stream.tokens_decoded == 10


def test_reply_ending_on_a_block_boundary_is_flushed(decoder: SpeechDecoder) -> None:
    stream = DecoderStream(decoder, schedule=(10, 20))
    pieces = [stream.push(_tokens(30, seed=2))]
    pieces.append(stream.finish())
    assert pieces[1].size == (decoder.cfg.mel_overlap_frames + 1) * 256  # held-back frames + seam frame
    assert sum(p.size for p in pieces) == decoder.cfg.flow.frames_for(30) * 256
    assert stream.finish().size == 0


def test_reset_and_default_draws_are_deterministic_and_private(decoder: SpeechDecoder) -> None:
    tokens = _tokens(40, seed=3)
    stream = DecoderStream(decoder)
    first = np.concatenate(_stream_all(stream, tokens))
    with pytest.raises(RuntimeError):
        stream.push(tokens[:1])
    stream.reset()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    again = np.concatenate(_stream_all(stream, tokens))
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is not touched
    np.testing.assert_array_equal(first, again)
    seeded = [np.concatenate(_stream_all(DecoderStream(decoder, seed=s), tokens)) for s in (1, 1, 2)]
    np.testing.assert_array_equal(seeded[0], seeded[1])
    assert np.abs(seeded[0] - seeded[2]).max() > 1e-3


def test_encoder_cache_matches_recompute_on_unaligned_blocks(decoder: SpeechDecoder) -> None:
    """25/50-token blocks leave a partial 10-token encoder block at each call: its tokens are recomputed."""
    tokens = _tokens(120, seed=4)
    outs = [
        np.concatenate(
            _stream_all(DecoderStream(decoder, schedule=(25, 50), cache_encoder=c), tokens, step=7)
        )
        for c in (False, True)
    ]
    assert np.abs(outs[0] - outs[1]).max() < 1e-4


def test_bounded_prompt_window(decoder: SpeechDecoder) -> None:
    tokens = _tokens(90, seed=6)
    full = np.concatenate(_stream_all(DecoderStream(decoder, max_prompt_tokens=None), tokens))
    wide = np.concatenate(_stream_all(DecoderStream(decoder, max_prompt_tokens=200), tokens))
    narrow = np.concatenate(_stream_all(DecoderStream(decoder, max_prompt_tokens=20), tokens))
    np.testing.assert_array_equal(full, wide)  # a window longer than the reply changes nothing
    assert narrow.shape == full.shape and np.isfinite(narrow).all()
    assert np.abs(narrow - full).max() > 0  # it is an approximation, measured in bench/bench_decoder.py
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        DecoderStream(decoder, max_prompt_tokens=0)


def _estimator_frames_per_block(
    decoder: SpeechDecoder, stream: DecoderStream, tokens: list[int]
) -> list[int]:
    """Frames the estimator integrates in each block of a streamed reply (read from its inputs)."""
    seen: list[int] = []
    hook = decoder.flow.decoder.estimator.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].shape[-1])
    )
    per_block = []
    try:
        for i in range(0, len(tokens), 7):
            before = stream.state.blocks_done
            stream.push(tokens[i : i + 7])
            if stream.state.blocks_done > before:
                assert stream.state.blocks_done == before + 1  # 7-token pushes complete at most one block
                per_block.append(max(seen))
                assert min(seen) == max(seen)  # every Euler step of a block sees the same frames
            seen.clear()
    finally:
        hook.remove()
    return per_block


def test_default_stream_bounds_estimator_work_per_block(decoder: SpeechDecoder) -> None:
    """Bounded cost (docs/decoder.md): under the official semantics a block's estimator work grows with the
    reply; the default schedule and prompt window keep it under a bound computed from the settings."""
    cap, window = DEFAULT_SCHEDULE[-1], DEFAULT_MAX_PROMPT_TOKENS
    frames = decoder.cfg.flow.frames_for
    tokens = _tokens(sum(DEFAULT_SCHEDULE) + 2 * cap, seed=11)  # two blocks past the growth (kept short: CPU)
    stream = DecoderStream(decoder)
    assert stream.tokens_to_next_block == DEFAULT_SCHEDULE[0] == 10  # first audio after 10 tokens (paper)
    bounded = _estimator_frames_per_block(decoder, stream, tokens)
    # Prompt window + the block's own frames + the re-made cross-fade frames (+1: truncation of frames_for).
    bound = frames(window) + frames(cap) + decoder.cfg.mel_overlap_frames + 1
    assert len(bounded) == len(DEFAULT_SCHEDULE) + 2
    assert max(bounded) <= bound, (bounded, bound)
    capped = bounded[len(DEFAULT_SCHEDULE) - 1 :]  # full-size blocks after a full window: flat
    assert max(capped) - min(capped) <= 1, capped
    unbounded = DecoderStream(decoder, max_prompt_tokens=None)
    official = _estimator_frames_per_block(decoder, unbounded, tokens[: sum(DEFAULT_SCHEDULE) + cap])
    assert official[:2] == bounded[:2]  # blocks whose prompt fits in the window are the official computation
    assert official[-1] > bound and official == sorted(official)  # unbounded: grows with the reply


def test_tokens_to_next_block_follows_the_schedule(decoder: SpeechDecoder) -> None:
    stream = DecoderStream(decoder, schedule=(10, 20, 40))
    assert stream.tokens_to_next_block == 10
    stream.push(_tokens(13, seed=12))  # one 10-token block, 3 pending
    assert stream.tokens_to_next_block == 17
    stream.push(_tokens(17, seed=13))
    assert stream.tokens_to_next_block == 40
    stream.push(_tokens(40, seed=14))
    assert stream.tokens_to_next_block == 40 and stream.tokens_decoded == 70  # the last size repeats


def test_bfloat16_runs_close_to_float32(ckpt_dir: Path, decoder: SpeechDecoder) -> None:
    bf16 = SpeechDecoder.from_pretrained(ckpt_dir, dtype=torch.bfloat16)
    tokens = _tokens(20, seed=8)
    ref, low = synthesize(decoder, tokens), synthesize(bf16, tokens)
    assert low.dtype == np.float32 and low.shape == ref.shape and np.isfinite(low).all()
    assert np.corrcoef(ref, low)[0, 1] > 0.99  # measured 0.9999 on this checkpoint


@pytest.mark.parametrize("bad", [[-1], [512], [3, 10**6], [1.5], [True], ["7"]])
def test_bad_token_ids_raise(decoder: SpeechDecoder, bad: list) -> None:
    with pytest.raises(ValueError, match="speech token"):
        synthesize(decoder, [1, 2, *bad])
    stream = DecoderStream(decoder)
    with pytest.raises(ValueError, match="speech token"):
        stream.push(bad)
    assert stream.state.pending == []


def test_empty_block_and_bad_schedule_raise(decoder: SpeechDecoder) -> None:
    with pytest.raises(ValueError, match="empty"):
        synthesize(decoder, [])
    with pytest.raises(ValueError, match="empty"):
        DecoderStream(decoder).decode_block([], finalize=False)
    with pytest.raises(ValueError, match="schedule"):
        DecoderStream(decoder, schedule=(2, 20))
    with pytest.raises(ValueError, match="schedule"):
        DecoderStream(decoder, schedule=())


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.yaml", "flow.pt", "hift.pt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_wrong_or_partial_checkpoint_raises(ckpt_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        SpeechDecoder.from_pretrained(tmp_path / "nope")
    missing = _copy_ckpt(ckpt_dir, tmp_path / "missing")
    (missing / "hift.pt").unlink()
    with pytest.raises(ValueError, match="hift.pt: missing"):
        SpeechDecoder.from_pretrained(missing)
    partial = _copy_ckpt(ckpt_dir, tmp_path / "partial")
    state = torch.load(partial / "flow.pt", weights_only=True)
    del state["encoder.after_norm.weight"]
    torch.save(state, partial / "flow.pt")
    with pytest.raises(ValueError, match=r"flow.pt: does not match config.yaml: 1 missing keys"):
        SpeechDecoder.from_pretrained(partial)
    garbage = _copy_ckpt(ckpt_dir, tmp_path / "garbage")
    (garbage / "hift.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="hift.pt: not a state dict"):
        SpeechDecoder.from_pretrained(garbage)
    resized = _copy_ckpt(ckpt_dir, tmp_path / "resized")
    text = (resized / "config.yaml").read_text().replace("linear_units: 64", "linear_units: 96")
    (resized / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match="feed_forward.w_1.weight has shape"):
        SpeechDecoder.from_pretrained(resized)
    nosection = _copy_ckpt(ckpt_dir, tmp_path / "nosection")
    (nosection / "config.yaml").write_text("sample_rate: 22050\n")
    with pytest.raises(ValueError, match="no 'flow' section"):
        SpeechDecoder.from_pretrained(nosection)


def test_new_style_weight_norm_keys_load_too(ckpt_dir: Path, decoder: SpeechDecoder, tmp_path: Path) -> None:
    """A hift.pt re-saved with torch.nn.utils.parametrizations.weight_norm names g/v differently."""
    renamed = _copy_ckpt(ckpt_dir, tmp_path / "renamed")
    state = torch.load(renamed / "hift.pt", weights_only=True)
    state = {
        k.replace(".weight_g", ".parametrizations.weight.original0").replace(
            ".weight_v", ".parametrizations.weight.original1"
        ): v
        for k, v in state.items()
    }
    torch.save(state, renamed / "hift.pt")
    again = SpeechDecoder.from_pretrained(renamed)
    tokens = _tokens(12, seed=9)
    np.testing.assert_array_equal(synthesize(again, tokens), synthesize(decoder, tokens))


def _state_tensors(stream) -> dict[str, object]:
    st = stream.state
    enc = st.flow_cache.encoder
    return {
        "prompt_mel": st.prompt_mel,
        "mel_overlap": st.mel_overlap,
        "cache_mel": st.cache_mel,
        "cache_source": st.cache_source,
        "enc_keys": enc.keys,
        "enc_values": enc.values,
        "enc_outputs": enc.outputs,
        "prompt_tokens": st.prompt_tokens,
        "pending": st.pending,
        "blocks_done": st.blocks_done,
        "finished": st.finished,
        "enc_length": enc.length_tokens,
    }


def _assert_same_state(a, b) -> None:
    for key, x in _state_tensors(a).items():
        y = _state_tensors(b)[key]
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            assert len(x) == len(y) and all(
                torch.allclose(p, q, atol=1e-5, rtol=0) for p, q in zip(x, y, strict=True)
            ), key
        elif isinstance(x, torch.Tensor):
            assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5, rtol=0), key
        else:
            assert x == y, key

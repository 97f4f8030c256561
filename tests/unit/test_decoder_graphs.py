"""Decoder CUDA graphs (pipeline/decoder/graphs.py), proven on the CPU: the enumerated block shapes are the
ones a real stream runs, and the static-buffer path a graph records gives the same audio as the normal path,
stream by stream, with each stream's own draws. The capture itself runs only on CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.decoder import batch
from pipeline.decoder.batch import BlockJob, decode_blocks
from pipeline.decoder.graphs import block_shapes, prepare_graphs
from pipeline.decoder.model import SpeechDecoder
from pipeline.decoder.stream import DEFAULT_SCHEDULE, DecoderStream
from pipeline.weights.random_decoder import write_random_checkpoint


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("decoder_graphs")
    write_random_checkpoint(path, vocab_size=512, seed=3)
    return path


@pytest.fixture(scope="module")
def decoder(ckpt_dir: Path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_decoder_stream
    yield SpeechDecoder.from_pretrained(ckpt_dir)
    torch.set_num_threads(threads)


@pytest.fixture
def eager_after(decoder: SpeechDecoder):
    yield decoder
    decoder.graphs = None  # the decoder is shared by the module's tests


def _tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 512, n).tolist()


def _shapes_run(
    decoder: SpeechDecoder, stream: DecoderStream, tokens: list[int]
) -> list[tuple[int, int, bool]]:
    """(estimator frames, vocoder frames, seam) of each block the stream runs, read from the modules'
    inputs."""
    flow: list[int] = []
    vocoder: list[tuple[int, bool]] = []
    hooks = [
        decoder.flow.decoder.estimator.register_forward_pre_hook(lambda _m, a: flow.append(a[0].shape[-1])),
        decoder.hift.register_forward_pre_hook(
            lambda _m, a: vocoder.append((a[0].shape[-1], a[3] is not None))
        ),
    ]
    try:
        for i in range(0, len(tokens), 9):
            stream.push(tokens[i : i + 9])
    finally:
        for hook in hooks:
            hook.remove()
    return [
        (f, v, seam) for f, (v, seam) in zip(flow[::10], vocoder, strict=True)
    ]  # 10 Euler steps per block


@pytest.mark.parametrize(
    ("schedule", "window", "legacy"),
    [(DEFAULT_SCHEDULE, 50, False), ((10, 20), 50, False), ((10, 20), 20, True), ((25, 50), None, False)],
)
def test_block_shapes_are_the_ones_a_stream_runs(decoder: SpeechDecoder, schedule, window, legacy) -> None:
    stream = DecoderStream(decoder, schedule=schedule, max_prompt_tokens=window, legacy_prompt=legacy)
    tokens = _tokens(sum(schedule) + 2 * schedule[-1] + 5, seed=1)  # past the growth, a partial block pending
    ran = _shapes_run(decoder, stream, tokens)
    expected = block_shapes(decoder, stream.settings, len(tokens))
    assert len(ran) == stream.state.blocks_done == len(expected) >= len(schedule) + 2
    assert ran == [(s.flow_frames, s.vocoder_frames, s.seam) for s in expected]


def test_a_bounded_window_gives_a_handful_of_shapes(decoder: SpeechDecoder) -> None:
    """What makes graphs worth it: a 2-minute reply's full blocks take few distinct shapes."""
    stream = DecoderStream(decoder, schedule=(10, 20))
    shapes = block_shapes(decoder, stream.settings, 1500)
    assert len(shapes) == 1 + (1500 - 10) // 20
    assert (
        len({s.flow_frames for s in shapes}) <= 8 and len({(s.vocoder_frames, s.seam) for s in shapes}) <= 8
    )
    unbounded = DecoderStream(decoder, schedule=(10, 20), max_prompt_tokens=None)
    assert len({s.flow_frames for s in block_shapes(decoder, unbounded.settings, 1500)}) == len(
        shapes
    )  # grows


def test_static_buffer_path_equals_the_normal_path(eager_after: SpeechDecoder) -> None:
    """Two interleaved streams (official seed-42 draws, and a seeded generator) through the static buffers
    give, push by push, the audio of the same streams on the plain modules: shared buffers, private draws."""
    decoder = eager_after
    tokens = [_tokens(137, seed=2), _tokens(121, seed=3)]

    def run(graphed: bool) -> list[list[np.ndarray]]:
        graphs = prepare_graphs(decoder, schedule=(10, 20), capture=False) if graphed else None
        decoder.graphs = graphs
        streams = [
            DecoderStream(decoder, schedule=(10, 20)),
            DecoderStream(decoder, schedule=(10, 20), seed=5),
        ]
        outs: list[list[np.ndarray]] = [[], []]
        for i in range(0, 140, 11):
            for k, stream in enumerate(streams):
                outs[k].append(stream.push(tokens[k][i : i + 11]))
        if graphs is not None:
            assert graphs.eager_runs == 0 and graphs.replays == 2 * sum(s.state.blocks_done for s in streams)
            assert graphs.replays >= 2 * 12
        for k, stream in enumerate(streams):
            outs[k].append(stream.finish())  # free length: eager
        if graphs is not None:
            assert graphs.eager_runs == 4
        return outs

    plain, static = run(False), run(True)
    for a, b in zip(plain, static, strict=True):
        assert [len(p) for p in a] == [len(p) for p in b]
        np.testing.assert_allclose(np.concatenate(b), np.concatenate(a), rtol=0, atol=1e-6)  # bit-equal here
        assert np.abs(np.concatenate(a)).max() > 0.01


def test_shapes_of_other_settings_run_eager(eager_after: SpeechDecoder) -> None:
    decoder = eager_after
    graphs = prepare_graphs(decoder, schedule=(10, 20), capture=False)
    stream = DecoderStream(decoder, schedule=(15, 30))
    out = stream.push(_tokens(45, seed=4))
    assert graphs is not None and graphs.replays == 0 and graphs.eager_runs == 4 and len(out) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graphs_equal_eager(ckpt_dir: Path) -> None:
    decoder = SpeechDecoder.from_pretrained(ckpt_dir, device="cuda")
    tokens = _tokens(130, seed=6)
    outs = []
    for graphed in (False, True):
        graphs = prepare_graphs(decoder, schedule=(10, 20)) if graphed else None
        assert not graphed or (graphs is not None and graphs.captured and len(graphs) > 0)
        outs.append(np.concatenate([DecoderStream(decoder, schedule=(10, 20)).push(tokens)]))
        assert not graphed or (graphs.replays > 0 and graphs.eager_runs == 0)
    assert np.abs(outs[0] - outs[1]).max() < 1e-4


def _batched_rounds(decoder: SpeechDecoder, rounds: int = 3) -> list[list[np.ndarray]]:
    """Three replies in batches per round: different block sizes (a padded batch of 3 rows in a bucket of 4),
    a finalising block of free length in the last round."""
    streams = [
        DecoderStream(decoder, schedule=(10, 20)),
        DecoderStream(decoder, seed=5),
        DecoderStream(decoder),
    ]
    out = []
    for r in range(rounds):
        jobs = [
            BlockJob(
                s,
                _tokens(s.tokens_to_next_block + (3 if r == rounds - 1 else 0), seed=10 * r + k),
                r == rounds - 1,
            )
            for k, s in enumerate(streams)
        ]
        results = decode_blocks(jobs)
        assert all(isinstance(x, np.ndarray) for x in results)
        out.append(results)
    return out


def test_batch_buckets_through_static_buffers_equal_the_eager_batch(
    eager_after: SpeechDecoder, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches padded to a recorded (batch, frames) bucket, unused rows included, give the eager batch's
    audio."""
    decoder = eager_after
    decoder.graphs = None
    monkeypatch.setattr(batch, "PADDED_DEVICES", frozenset({"cpu"}))  # padded batches, as on a GPU
    eager = _batched_rounds(decoder)
    graphs = prepare_graphs(decoder, capture=False)
    assert graphs is not None and graphs.eager_runs == 0
    static = _batched_rounds(decoder)
    assert graphs.replays >= 2 * 3 and graphs.eager_runs == 0  # every batch's flow and vocoder in a bucket
    for a_round, b_round in zip(eager, static, strict=True):
        for a, b in zip(a_round, b_round, strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    assert not [rec for rec in caplog.records if rec.name == "pipeline.decoder.batch"], "a batch fell back"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_batch_graphs_equal_eager(ckpt_dir: Path) -> None:
    decoder = SpeechDecoder.from_pretrained(ckpt_dir, device="cuda")
    eager = _batched_rounds(decoder)
    graphs = prepare_graphs(decoder)
    assert graphs is not None and graphs.captured
    graphed = _batched_rounds(decoder)
    assert graphs.replays >= 2 * 3 and graphs.eager_runs == 0
    for a_round, b_round in zip(eager, graphed, strict=True):
        for a, b in zip(a_round, b_round, strict=True):
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-4

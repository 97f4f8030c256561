"""Decoder blocks of several replies in one batch (pipeline/decoder/batch.py) against the same blocks decoded
alone: a tiny random checkpoint, twin streams fed the same jobs, one side batched, the other one by one."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch

from pipeline.decoder import batch
from pipeline.decoder.batch import MAX_BATCH, BlockJob, decode_blocks, decode_one
from pipeline.decoder.draws import SeededDraws
from pipeline.decoder.model import SpeechDecoder
from pipeline.decoder.stream import DecoderStream
from pipeline.weights.random_decoder import write_random_checkpoint

TOL = 1e-5  # float32, CPU: batched rows see the same real frames as alone; only summation order differs
VOCAB = 512

# Stream settings of the mix: first blocks and later ones, growing and official-like schedules, the prompt
# window and the unbounded prompt, the legacy prompt, the encoder cache on and off, seeded draws.
SETTINGS: list[dict] = [
    {},
    {"legacy_prompt": True, "schedule": (25, 50), "max_prompt_tokens": None},
    {"cache_encoder": False, "schedule": (7, 13)},
    {"seed": 3, "max_prompt_tokens": 12},
    {"schedule": (6,), "legacy_prompt": True, "cache_encoder": False},
]

# Per round, per stream: (tokens, finish). Rounds give first blocks, several blocks in one push, pushes that
# complete no block, a finalising block, a tail-only flush (finish with nothing pending) and an idle stream.
SCRIPT: list[list[tuple[int, bool]]] = [
    [(10, False), (25, False), (7, False), (10, False), (6, False)],
    [(30, False), (3, False), (20, False), (4, False), (12, False)],
    [(20, False), (50, False), (0, False), (26, False), (6, True)],
    [(40, True), (0, True), (13, True), (5, False), (0, False)],
]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("decoder")
    write_random_checkpoint(path, vocab_size=VOCAB, seed=11)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: see tests/unit/test_decoder_stream.py
    yield SpeechDecoder.from_pretrained(path)
    torch.set_num_threads(threads)


@pytest.fixture
def batched_only(caplog: pytest.LogCaptureFixture):
    """The batch itself must succeed: its fallback (each job alone) would hide a batching bug."""
    with caplog.at_level(logging.WARNING, logger="pipeline.decoder.batch"):
        yield
    assert not [r for r in caplog.records if r.name == "pipeline.decoder.batch"], "a batch fell back"


@pytest.fixture
def padded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of different sizes pad into one batch on the CPU too (as on a GPU): the path under test."""
    monkeypatch.setattr(batch, "PADDED_DEVICES", frozenset({"cpu", "cuda"}))


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(0, VOCAB, n).tolist()


def _twins(decoder: SpeechDecoder) -> tuple[list[DecoderStream], list[DecoderStream]]:
    return tuple([DecoderStream(decoder, **s) for s in SETTINGS] for _ in range(2))  # type: ignore[return-value]


def _assert_same(batched: np.ndarray | Exception, alone: np.ndarray | Exception, what: str) -> None:
    assert isinstance(batched, np.ndarray) and isinstance(alone, np.ndarray), what
    assert batched.dtype == np.float32 and batched.shape == alone.shape, what
    if alone.size:
        assert float(np.abs(batched - alone).max()) <= TOL, what


def _run_script(
    decoder: SpeechDecoder, order: Callable[[list[int]], list[int]] = lambda ks: ks
) -> list[list[np.ndarray]]:
    """The script on twin streams; per round, the batched results (jobs in `order`) checked against alone."""
    batched, alone = _twins(decoder)
    rng = np.random.default_rng(5)
    heard = []
    for r, round_ in enumerate(SCRIPT):
        jobs = [(k, _tokens(rng, n), finish) for k, (n, finish) in enumerate(round_)]
        ks = order([k for k, _, _ in jobs])
        results = decode_blocks([BlockJob(batched[k], jobs[k][1], jobs[k][2]) for k in ks])
        expect = [decode_one(BlockJob(alone[k], tokens, finish)) for k, tokens, finish in jobs]
        for slot, k in enumerate(ks):
            _assert_same(results[slot], expect[k], f"round {r} stream {k} {SETTINGS[k]}")
        for a, b in zip(batched, alone, strict=True):
            assert a.tokens_decoded == b.tokens_decoded and a.state.finished == b.state.finished
            assert a.state.pending == b.state.pending and a.state.blocks_done == b.state.blocks_done
        heard.append(expect)
    return heard


def test_a_batch_of_mixed_blocks_equals_each_block_alone(
    decoder: SpeechDecoder, batched_only: None, padded: None
) -> None:
    heard = _run_script(decoder)
    assert any(p.size for rnd in heard for p in rnd)  # the script makes audio
    assert heard[3][1].size > 0  # the tail-only flush vocoded held-back frames


def test_results_follow_the_job_order(decoder: SpeechDecoder, batched_only: None, padded: None) -> None:
    _run_script(decoder, order=lambda ks: ks[::-1])


def test_padded_batch_gives_each_row_its_own_audio(
    decoder: SpeechDecoder, batched_only: None, padded: None
) -> None:
    """Rows of very different lengths in one batch (first block next to a long reply's block)."""
    rng = np.random.default_rng(9)
    long_alone, long_batched = (DecoderStream(decoder, max_prompt_tokens=None) for _ in range(2))
    prefix = _tokens(rng, 70)
    long_alone.push(prefix), long_batched.push(prefix)
    first = [DecoderStream(decoder, seed=s) for s in (1, 2)]
    first_twin = [DecoderStream(decoder, seed=s) for s in (1, 2)]
    block = _tokens(rng, 80)
    short = _tokens(rng, 10)
    results = decode_blocks(
        [BlockJob(long_batched, block, False)] + [BlockJob(s, short, False) for s in first]
    )
    _assert_same(results[0], long_alone.push(block), "long row")
    for res, twin in zip(results[1:], first_twin, strict=True):
        _assert_same(res, twin.push(short), "short row")


class _FailingDraws(SeededDraws):
    """Seeded draws that raise at the given block (counted from 0)."""

    def __init__(self, decoder: SpeechDecoder, fail_at: int):
        super().__init__(decoder.device, 4, decoder.cfg.flow.mel_bins)
        self.blocks, self.fail_at = 0, fail_at

    def begin_block(self) -> None:
        self.blocks += 1
        if self.blocks - 1 == self.fail_at:
            raise RuntimeError("injected decoder failure")

    def snapshot(self) -> object:
        return self.blocks, super().snapshot()

    def restore(self, snapshot: object) -> None:
        self.blocks, rest = snapshot  # type: ignore[misc]
        super().restore(rest)


def test_a_failing_job_fails_only_itself(decoder: SpeechDecoder) -> None:
    batched, alone = _twins(decoder)
    bad = DecoderStream(decoder, draws=_FailingDraws(decoder, fail_at=1))
    rng = np.random.default_rng(2)
    for r in range(3):
        tokens = [_tokens(rng, 10 + 10 * r) for _ in batched]
        jobs = [BlockJob(s, t, False) for s, t in zip(batched, tokens, strict=True)]
        bad_tokens = _tokens(rng, bad.tokens_to_next_block)  # one block each round
        results = decode_blocks(jobs[:2] + [BlockJob(bad, bad_tokens, False)] + jobs[2:])
        if r == 1:  # the batch raised inside the model calls: the bad job alone fails, the others are decoded
            assert isinstance(results[2], RuntimeError) and "injected" in str(results[2])
        else:
            assert isinstance(results[2], np.ndarray)
        results = results[:2] + results[3:]
        for k, (s, t) in enumerate(zip(alone, tokens, strict=True)):
            _assert_same(results[k], decode_one(BlockJob(s, t, False)), f"round {r} stream {k}")
    # Bad input fails before any model work, in its own slot.
    results = decode_blocks([BlockJob(batched[0], [VOCAB + 1], False), BlockJob(batched[1], [1, 2], False)])
    assert isinstance(results[0], ValueError) and isinstance(results[1], np.ndarray)
    with pytest.raises(ValueError, match="more than one job"):
        decode_blocks([BlockJob(batched[0], [1], False), BlockJob(batched[0], [2], False)])


def test_more_jobs_than_the_bound_run_in_several_batches(decoder: SpeechDecoder, batched_only: None) -> None:
    n = MAX_BATCH + 2
    batched = [DecoderStream(decoder, seed=s) for s in range(n)]
    alone = [DecoderStream(decoder, seed=s) for s in range(n)]
    rng = np.random.default_rng(4)
    tokens = [_tokens(rng, 10) for _ in range(n)]
    results = decode_blocks([BlockJob(s, t, True) for s, t in zip(batched, tokens, strict=True)])
    for k, (s, t) in enumerate(zip(alone, tokens, strict=True)):
        _assert_same(results[k], decode_one(BlockJob(s, t, True)), f"stream {k}")


def test_on_the_cpu_only_blocks_of_one_size_share_a_batch(
    decoder: SpeechDecoder, batched_only: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows: list[int] = []
    real = batch.run_blocks
    monkeypatch.setattr(
        batch, "run_blocks", lambda dec, blocks: rows.append(len(blocks)) or real(dec, blocks)
    )
    rng = np.random.default_rng(6)
    twins = [[DecoderStream(decoder, seed=s) for s in range(4)] for _ in range(2)]
    history = _tokens(rng, 10)
    for streams in twins:
        streams[1].push(history)  # its next block has 20 tokens; the others' first blocks 10
    tokens = [_tokens(rng, s.tokens_to_next_block) for s in twins[0]]
    results = decode_blocks([BlockJob(s, t, False) for s, t in zip(twins[0], tokens, strict=True)])
    assert sorted(rows) == [1, 3]
    for k, (s, t) in enumerate(zip(twins[1], tokens, strict=True)):
        _assert_same(results[k], decode_one(BlockJob(s, t, False)), f"stream {k}")

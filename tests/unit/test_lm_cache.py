"""Streaming LM path on a tiny random checkpoint in the official format: conversion, KV cache reuse,
batched decode across calls of different lengths, rollback, context policy, sampling, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline.lm.history import DialogueHistory
from pipeline.lm.kv_cache import ContextFullError, LMCache, PoolFullError, common_prefix_len
from pipeline.lm.model import VoiceLM
from pipeline.lm.sampling import sample_logits
from pipeline.lm.text_tokenizer import GLMTokenizer
from pipeline.weights.random_lm import write_random_checkpoint
from pipeline.weights.random_text import write_tokenizer_files
from tests.helpers.prompts import start_turn

TOL = 1e-4
SIZES = dict(hidden_size=64, num_layers=2, num_heads=4, kv_groups=2, head_dim=16, ffn_hidden_size=128)


def _checkpoint(out: Path, *, seed: int = 7, vocab_size: int | None = None, **kw) -> Path:
    """Tokenizer files + a checkpoint whose vocab covers them (rounded up to 64, as padded_vocab_size)."""
    write_tokenizer_files(out, num_audio_tokens=64, seed=seed)
    vocab = vocab_size or (GLMTokenizer.from_pretrained(out).vocab_size + 63) // 64 * 64
    write_random_checkpoint(out, **{**SIZES, **kw}, vocab_size=vocab, seed=seed, num_shards=3)
    return out


def prefill_to(lm: VoiceLM, cache: LMCache, ids: list[int]) -> torch.Tensor:
    """What the engine does at a turn start: keep the common prefix, prefill the rest (the last id is
    re-run)."""
    keep = min(common_prefix_len(cache.token_ids, ids), len(ids) - 1)
    cache.truncate(keep)
    return lm.prefill(cache, ids[keep:])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def lm(ckpt: Path) -> VoiceLM:
    torch.set_num_threads(2)
    return VoiceLM.from_pretrained(ckpt)


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_checkpoint_is_sharded_official_format(ckpt: Path, lm: VoiceLM) -> None:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in index["weight_map"]
    assert lm.config.num_layers == SIZES["num_layers"] and lm.max_context_tokens == 8192
    assert lm.tokenizer is not None and lm.dtype == torch.float32


def test_prefill_matches_full_forward(lm: VoiceLM) -> None:
    ids = _ids(40, 1, lm.config.vocab_size)
    full = lm.logits(ids)
    cache = lm.new_cache()
    assert torch.allclose(lm.prefill(cache, ids), full[-1], atol=TOL)
    assert cache.length == 40


def test_cache_reuse_across_turns_equals_fresh_prefill(lm: VoiceLM) -> None:
    tok = lm.tokenizer
    history = DialogueHistory(tok)
    cache = lm.new_cache()
    prompt = start_turn(history, speech_tokens=[3, 1, 4, 1, 5])
    prefill_to(lm, cache, prompt)
    reply = lm.generate(prompt, 6)  # any ids: stands for the model's reply
    for t in reply:
        lm.decode_step([cache], [t])
    history.add_reply(reply)
    prompt2 = start_turn(history, speech_tokens=[9, 2, 6])
    before = cache.length
    logits2 = prefill_to(lm, cache, prompt2)
    assert (
        before == len(prompt) + len(reply) and cache.token_ids == prompt2
    )  # only the new turn was prefilled
    fresh = lm.new_cache()
    assert torch.allclose(logits2, lm.prefill(fresh, prompt2), atol=TOL)
    assert torch.allclose(logits2, lm.logits(prompt2)[-1], atol=TOL)


def test_batched_decode_of_different_lengths_equals_each_alone(lm: VoiceLM) -> None:
    V = lm.config.vocab_size
    prompts = [_ids(n, 10 + n, V) for n in (3, 17, 30)]
    nxt = [_ids(4, 20 + i, V) for i in range(3)]
    alone = []
    for p, steps in zip(prompts, nxt, strict=True):
        c = lm.new_cache()
        lm.prefill(c, p)
        alone.append(torch.stack([lm.decode_step([c], [t])[0] for t in steps]))
        c.release()
    caches = [lm.new_cache() for _ in prompts]
    for c, p in zip(caches, prompts, strict=True):
        lm.prefill(c, p)
    batched = torch.stack([lm.decode_step(caches, [s[i] for s in nxt]) for i in range(4)], dim=1)  # (3, 4, V)
    for b in range(3):
        assert torch.allclose(batched[b], alone[b], atol=1e-5)
        assert torch.allclose(batched[b, -1], lm.logits(prompts[b] + nxt[b])[-1], atol=TOL)


def test_truncate_rolls_back(lm: VoiceLM) -> None:
    V = lm.config.vocab_size
    ids, other = _ids(20, 3, V), _ids(5, 4, V)
    cache = lm.new_cache()
    lm.prefill(cache, ids + _ids(7, 5, V))  # barge-in: 7 tokens were generated but never heard
    cache.truncate(20)
    assert torch.allclose(lm.prefill(cache, other), lm.logits(ids + other)[-1], atol=TOL)
    with pytest.raises(ValueError):
        cache.truncate(99)


def test_fixed_pool_refuses_past_capacity_and_keeps_live_caches(ckpt: Path) -> None:
    lm = VoiceLM.from_pretrained(ckpt)
    lm.reserve_caches(3, context_tokens=96)
    V = lm.config.vocab_size
    first = lm.new_cache()
    ids = _ids(12, 8, V)
    lm.prefill(first, ids)
    others = [lm.new_cache() for _ in range(2)]
    assert sorted(c.slot for c in [first, *others]) == [0, 1, 2]  # the scratch slot is never handed out
    with pytest.raises(PoolFullError, match="max_calls"):
        lm.new_cache()
    with pytest.raises(RuntimeError, match="held"):
        lm.reserve_caches(8)  # no reallocation under live caches
    assert torch.allclose(lm.decode_step([first], [5])[0], lm.logits([*ids, 5])[-1], atol=TOL)
    freed = others[0].slot
    others[0].release()
    assert lm.new_cache().slot == freed


def test_slots_sized_by_context_not_seq_length(ckpt: Path) -> None:
    lm = VoiceLM.from_pretrained(ckpt)
    G, D = lm.config.kv_groups, lm.config.head_dim
    lm.reserve_caches(2, context_tokens=64)
    assert lm.max_context_tokens == 64 and tuple(lm.pool.k[0].shape) == (3, G, 64, D)
    assert lm.pool.bytes_per_slot == 2 * lm.config.num_layers * G * 64 * D * 4
    cache = lm.new_cache()
    with pytest.raises(ContextFullError):
        lm.prefill(cache, _ids(65, 1, lm.config.vocab_size))
    cache.release()
    lm.reserve_caches(2, context_tokens=10**6)
    assert lm.max_context_tokens == lm.config.seq_length


@pytest.mark.parametrize("whole_pool", [False, True], ids=["gather", "whole_pool"])
def test_padded_batch_equals_each_alone(
    ckpt: Path, whole_pool: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5 calls run as 8 rows (3 padding rows on the scratch slot), in either attention layout."""
    import pipeline.lm.model as lm_module

    lm = VoiceLM.from_pretrained(ckpt)
    lm.reserve_caches(8)
    monkeypatch.setattr(lm_module, "GATHER_COST_FACTOR", 10**6 if whole_pool else 0)
    assert lm.whole_pool_attention(8) == whole_pool
    V = lm.config.vocab_size
    prompts = [_ids(n, 30 + n, V) for n in (2, 9, 33, 5, 14)]
    caches = [lm.new_cache() for _ in prompts]
    for c, p in zip(caches, prompts, strict=True):
        lm.prefill(c, p)
    nxt = _ids(5, 77, V)
    batched = lm.decode_step(caches, nxt)
    assert batched.shape == (5, V)
    for b in range(5):
        assert torch.allclose(batched[b], lm.logits(prompts[b] + [nxt[b]])[-1], atol=TOL)


def test_device_reaches_every_allocation(lm: VoiceLM) -> None:
    """KV pool and staging buffers live on the model's device; no code path names a bare CUDA device or
    the current device (a `cuda:1` engine would otherwise put streams and graphs on cuda:0)."""
    tensors = [*lm.pool.k, *lm.pool.v, lm._stage]
    assert all(t.device == lm.device for t in tensors)
    assert lm.pool.device == lm.device
    import re

    src = "".join(
        (Path(__file__).parents[2] / "pipeline" / "lm" / f).read_text() for f in ("model.py", "kv_cache.py")
    )
    assert not re.search(r"current_device\(\)|Stream\(\)|current_stream\(\)|[\"']cuda[\"']\)", src)


def test_context_full_and_dropping_oldest_turns(tmp_path: Path) -> None:
    lm = VoiceLM.from_pretrained(_checkpoint(tmp_path, seq_length=256))
    cache = lm.new_cache()
    with pytest.raises(ContextFullError):
        lm.prefill(cache, [1] * 257)
    history = DialogueHistory(lm.tokenizer)
    for k in range(3):
        start_turn(history, speech_tokens=[k] * 8)
        history.add_reply([lm.tokenizer.audio_id(1)] * 4)
    before = len(history.ids())
    reserve = lm.max_context_tokens - before + 1  # one token too many: the oldest turn must go
    assert history.fit(lm.max_context_tokens, reserve_tokens=reserve) == 2  # the user item and its reply
    assert len(history.turns) == 2 and len(history.ids()) + reserve <= lm.max_context_tokens
    assert history.ids()[: len(history.system_ids)] == history.system_ids
    logits = prefill_to(lm, cache, history.ids())  # re-prefilled after the drop
    assert torch.allclose(logits, lm.logits(history.ids())[-1], atol=TOL)


def test_sampling_filters_and_greedy(lm: VoiceLM) -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, lm.config.vocab_size)
    best = logits.argmax(-1)
    assert torch.equal(sample_logits(logits, 0.0), best)
    assert torch.equal(sample_logits(logits, 1.0, top_k=1), best)
    assert torch.equal(sample_logits(logits, 1.0, top_p=1e-6), best)
    top2 = logits.topk(2).indices
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_logits(logits, 5.0, top_k=2, generator=g) for _ in range(200)])  # (200, 4)
    assert ((draws == top2[:, :1].T) | (draws == top2[:, 1:].T)).all()
    assert (draws != best).any()  # really samples
    same = [sample_logits(logits, 0.8, 0.8, 50, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    per_row = sample_logits(logits, torch.tensor([0.0, 0.0, 1.0, 1.0]), top_k=torch.tensor([0, 0, 1, 1]))
    assert torch.equal(per_row, best)


def test_generate_stops_at_stop_id(lm: VoiceLM) -> None:
    ids = _ids(10, 9, lm.config.vocab_size)
    free = lm.generate(ids, 8)
    stop = free[2]
    assert lm.generate(ids, 8, stop_ids=frozenset({stop}))[-1] == stop
    assert len(lm.generate(ids, 8, stop_ids=frozenset({stop}))) == free.index(stop) + 1


def test_int4_loads_and_runs(ckpt: Path, lm: VoiceLM) -> None:
    pytest.importorskip("bitsandbytes")
    q = VoiceLM.from_pretrained(ckpt, quantization="int4")
    assert type(q.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    ids = _ids(12, 11, lm.config.vocab_size)
    a, b = q.logits(ids), lm.logits(ids)
    assert a.shape == b.shape and torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9
    assert torch.allclose(q.prefill(q.new_cache(), ids), a[-1], atol=1e-2)


def test_bad_input_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        VoiceLM.from_pretrained(tmp_path)
    ck = _checkpoint(tmp_path / "ok")
    cfg = json.loads((ck / "config.json").read_text())
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        VoiceLM.from_pretrained(tmp_path / "llama")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="bitsandbytes"):
        VoiceLM.from_pretrained(ck, quantization="int4")
    monkeypatch.undo()
    shard = sorted(ck.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=shard.name):
        VoiceLM.from_pretrained(ck)


def test_vocab_mismatch(tmp_path: Path) -> None:
    small = _checkpoint(tmp_path / "small", vocab_size=128)  # the tokenizer has more ids than the LM rows
    with pytest.raises(ValueError, match="tokenizer_config.json.*vocab mismatch"):
        VoiceLM.from_pretrained(small)

    def cut_rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:-8] if name == "transformer.embedding.word_embeddings.weight" else tensor

    bad = tmp_path / "rows"
    write_random_checkpoint(bad, **SIZES, vocab_size=256, seed=1, tensor_hook=cut_rows)
    with pytest.raises(ValueError, match=r"safetensors.*vocab mismatch"):
        VoiceLM.from_pretrained(bad)


def test_chunked_prefill_and_length_buckets(lm: VoiceLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small prefill chunks and attention buckets, so chunk and bucket boundaries are crossed."""
    import pipeline.lm.model as lm_module

    monkeypatch.setattr(lm_module, "PREFILL_CHUNK_TOKENS", 7)
    monkeypatch.setattr(lm_module, "MIN_ATTEND_TOKENS", 4)
    V = lm.config.vocab_size
    ids, steps = _ids(40, 12, V), _ids(30, 13, V)
    cache = lm.new_cache()
    rows = [lm.prefill(cache, ids)] + [lm.decode_step([cache], [t])[0] for t in steps]
    assert torch.allclose(torch.stack(rows), lm.logits(ids + steps)[len(ids) - 1 :], atol=TOL)


def test_without_multi_query_attention(tmp_path: Path) -> None:
    """multi_query_attention false: ChatGLM gives every query head its own K/V (group count ignored)."""
    ck = tmp_path / "mha"
    write_random_checkpoint(ck, **{**SIZES, "kv_groups": SIZES["num_heads"]}, vocab_size=128, seed=2)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(
        json.dumps({**cfg, "multi_query_attention": False, "multi_query_group_num": 1})
    )
    lm = VoiceLM.from_pretrained(ck)
    assert lm.config.kv_groups == SIZES["num_heads"]
    ids = _ids(9, 14, 128)
    assert torch.allclose(lm.prefill(lm.new_cache(), ids), lm.logits(ids)[-1], atol=TOL)


def test_directory_without_weights(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path / "ok")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((ck / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VoiceLM.from_pretrained(tmp_path / "empty")

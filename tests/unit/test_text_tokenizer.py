"""GLM-4 text tokenizer against tiny tokenizer files in the official format, written by the test."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import tiktoken

from pipeline.lm.text_tokenizer import GLM4_SPLIT_PATTERN, GLMTokenizer
from pipeline.weights.random_text import write_tokenizer_files


def _ids_in_file(d: Path) -> dict[str, int]:
    decoder = json.loads((d / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return {e["content"]: int(i) for i, e in decoder.items()}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(
        d,
        merges_text=["hello hello world, the world says hello", "你好你好世界"],
        num_audio_tokens=100,
        seed=5,
    )
    return d


def test_special_ids_come_from_the_config(tok_dir: Path, tmp_path: Path) -> None:
    tok = GLMTokenizer.from_pretrained(tok_dir)
    ids = _ids_in_file(tok_dir)
    assert tok.audio_offset == ids["<|audio_0|>"] and tok.num_audio_tokens == 100
    assert tok.audio_id(99) == ids["<|audio_99|>"] and tok.is_audio(ids["<|audio_42|>"])
    assert not tok.is_audio(ids["<|end_of_audio|>"])
    assert (tok.user_id, tok.assistant_id, tok.system_id) == (
        ids["<|user|>"],
        ids["<|assistant|>"],
        ids["<|system|>"],
    )
    assert (tok.begin_of_audio_id, tok.end_of_audio_id) == (
        ids["<|begin_of_audio|>"],
        ids["<|end_of_audio|>"],
    )
    assert tok.prefix_ids == [ids["[gMASK]"], ids["<sop>"]]
    assert tok.stop_ids == frozenset({ids["<|user|>"], ids["<|endoftext|>"], ids["<|observation|>"]})
    # Another seed moves the specials (another number of reserved slots): the tokenizer follows the file.
    write_tokenizer_files(tmp_path, num_audio_tokens=100, seed=6)
    other = GLMTokenizer.from_pretrained(tmp_path)
    assert other.audio_offset == _ids_in_file(tmp_path)["<|audio_0|>"] != tok.audio_offset


def test_rewritten_ids_are_followed(tok_dir: Path, tmp_path: Path) -> None:
    """Shift every special id by 1000 in the file: every attribute moves with it."""
    (tmp_path / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(int(i) + 1000): e for i, e in cfg["added_tokens_decoder"].items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    a, b = GLMTokenizer.from_pretrained(tok_dir), GLMTokenizer.from_pretrained(tmp_path)
    assert b.audio_offset == a.audio_offset + 1000 and b.user_id == a.user_id + 1000
    assert b.encode("<|user|>hi<|audio_3|>") == [a.user_id + 1000, *a.encode("hi"), a.audio_id(3) + 1000]


def test_text_round_trip_and_bpe(tok_dir: Path) -> None:
    tok = GLMTokenizer.from_pretrained(tok_dir)
    for text in ["hello world", "Grüße, 你好世界! 🎉 12345\n\n  tabs\tand spaces  ", "x<|fake|>y [gMASK"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("hello world")) < len(b"hello world")  # merges are used
    # Same ids as tiktoken with the same ranks and the GLM-4 split pattern.
    ranks = {}
    for line in (tok_dir / "tokenizer.model").read_text().splitlines():
        b64, rank = line.split()
        ranks[base64.b64decode(b64)] = int(rank)
    ref = tiktoken.Encoding("ref", pat_str=GLM4_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    text = "the world says hello, 你好"
    assert tok.encode(text) == ref.encode_ordinary(text)


def test_special_strings_are_recognised(tok_dir: Path) -> None:
    tok = GLMTokenizer.from_pretrained(tok_dir)
    ids = _ids_in_file(tok_dir)
    text = "<|system|>\nhi<|user|>\n<|begin_of_audio|><|audio_7|><|audio_0|><|end_of_audio|><|assistant|>ok"
    got = tok.encode(text)
    assert (
        got[0] == ids["<|system|>"]
        and ids["<|audio_7|>"] in got
        and got.count(ids["<|begin_of_audio|>"]) == 1
    )
    assert tok.decode(got) == text
    assert "<|audio_100|>" not in ids  # only 100 audio tokens
    assert tok.encode("<|audio_100|>") == tok.encode("<|audio_100") + tok.encode("|>")  # not a token: text


def test_bad_files_are_named(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        GLMTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_text("not base64 at all\n")
    (tmp_path / "tokenizer_config.json").write_text((tok_dir / "tokenizer_config.json").read_text())
    with pytest.raises(ValueError, match="tokenizer.model:1"):
        GLMTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_text((tok_dir / "tokenizer.model").read_text())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {
        i: e for i, e in cfg["added_tokens_decoder"].items() if e["content"] != "<|audio_0|>"
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tokenizer_config.json.*audio_0"):
        GLMTokenizer.from_pretrained(tmp_path)

"""Small text tokenizers in the official GLM-4 format (`tokenizer.model` + `tokenizer_config.json`)."""

from __future__ import annotations

import base64
import json
import random
from collections import Counter
from pathlib import Path

import regex

from pipeline.lm.text_tokenizer import GLM4_SPECIALS, GLM4_SPLIT_PATTERN

_DEFAULT_MERGE_TEXT = [
    "Hello! How are you today? I am fine, thank you. The weather is nice and the sun is shining.",
    "User will provide you with a speech instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens.",
    "你好，今天天气很好。我们一起去公园散步吧。",
]


def _train_merges(texts: list[str], ranks: dict[bytes, int], num_merges: int) -> None:
    """Greedy byte-pair merges over the pre-split words of `texts`, appended to `ranks` in merge order."""
    words = Counter(
        tuple(bytes([b]) for b in w.encode("utf-8"))
        for t in texts
        for w in regex.findall(GLM4_SPLIT_PATTERN, t)
    )
    for _ in range(num_merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            return
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            return
        ranks[a + b] = len(ranks)
        merged: Counter[tuple[bytes, ...]] = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged


def write_tokenizer_files(
    out_dir: str | Path,
    *,
    merges_text: list[str] | None = None,
    num_audio_tokens: int = 16384,
    seed: int = 0,
    num_merges: int = 300,
) -> None:
    """Write a small `tokenizer.model` + `tokenizer_config.json` in the official format.

    All 256 single bytes are ranks (so any UTF-8 text encodes), followed by up to `num_merges` merges learnt
    from `merges_text`. Specials follow the ranks in the GLM-4 order, then a seeded number of reserved slots
    (so that `<|audio_0|>`'s id is not a constant a reader could hard-code), then the audio tokens.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    single = [bytes([b]) for b in range(256)]
    rng.shuffle(single)
    ranks = {tok: i for i, tok in enumerate(single)}
    _train_merges(merges_text if merges_text is not None else _DEFAULT_MERGE_TEXT, ranks, num_merges)
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}" for tok, rank in ranks.items()]
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n", encoding="utf-8")

    reserved = [f"<|reserved_{i}|>" for i in range(rng.randint(3, 40))]
    contents = [*GLM4_SPECIALS, *reserved, *(f"<|audio_{k}|>" for k in range(num_audio_tokens))]
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    decoder = {str(len(ranks) + i): {"content": c, **flags} for i, c in enumerate(contents)}
    config = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(GLM4_SPECIALS[6:]),
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 128000,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
    )

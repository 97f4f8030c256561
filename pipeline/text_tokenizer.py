"""GLM-4 text tokenizer of glm-4-voice-9b, read from the checkpoint's own files (REFERENCE §3.5).

`tokenizer.model` holds tiktoken BPE ranks (one `base64(token) rank` line each); `tokenizer_config.json`'s
`added_tokens_decoder` holds every special token (role tokens, `[gMASK]`, `<sop>`, `<|begin_of_audio|>`,
reserved slots and the 16,384 `<|audio_k|>`) with its id. Every special id is read from that file, never
assumed: third-party code disagrees on where `<|audio_0|>` sits (REFERENCE §2.5).
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections import Counter
from pathlib import Path

import regex
import tiktoken

# GLM-4 pre-tokenisation regex (ChatGLM4Tokenizer, REFERENCE §3.5).
GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The GLM-4 control block in its official order; voice adds the two audio brackets (REFERENCE §3.5).
GLM4_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>", "<|begin_of_audio|>", "<|end_of_audio|>",
)  # fmt: skip
_AUDIO_RE = re.compile(r"<\|audio_(\d+)\|>")
# Candidate special strings in user text; a candidate that is not a known special stays text.
_CANDIDATE = r"<\|[^<>\[\]|\s]*\|>|\[[^<>\[\]|\s]*\]|<[^<>\[\]|\s]*>"
_DEFAULT_MERGE_TEXT = [
    "Hello! How are you today? I am fine, thank you. The weather is nice and the sun is shining.",
    "User will provide you with a speech instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens.",
    "你好，今天天气很好。我们一起去公园散步吧。",
]


class GLMTokenizer:
    """Encode/decode text, special tokens and `<|audio_k|>`; ids of specials come from the config file."""

    def __init__(self, ranks: dict[bytes, int], specials: dict[str, int], source: Path) -> None:
        self.source = source
        self._enc = tiktoken.Encoding(
            name=f"glm4-{source.name}", pat_str=GLM4_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )
        self.num_ranks = max(ranks.values()) + 1  # ids below are BPE ranks (a gap decodes to b"")
        self.special_ids = dict(specials)  # content -> id
        self._special_content = {i: s for s, i in specials.items()}
        cfg_file = source / "tokenizer_config.json"
        for name in ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                     "<|observation|>", "<|begin_of_audio|>", "<|end_of_audio|>"):  # fmt: skip
            if name not in specials:
                raise ValueError(f"{cfg_file}: added_tokens_decoder has no {name!r}; not a GLM-4-Voice tokenizer")
        audio = sorted((int(m.group(1)), i) for s, i in specials.items() if (m := _AUDIO_RE.fullmatch(s)))
        if not audio or audio[0][0] != 0:
            raise ValueError(f"{cfg_file}: no '<|audio_0|>' in added_tokens_decoder")
        self.audio_offset = audio[0][1]  # LM id of <|audio_0|>
        self.num_audio_tokens = len(audio)
        for k, (value, token_id) in enumerate(audio):
            if value != k or token_id != self.audio_offset + k:
                raise ValueError(f"{cfg_file}: audio tokens are not contiguous at <|audio_{value}|> (id {token_id})")
        self.eos_id = specials["<|endoftext|>"]
        self.user_id = specials["<|user|>"]
        self.assistant_id = specials["<|assistant|>"]
        self.system_id = specials["<|system|>"]
        self.observation_id = specials["<|observation|>"]
        self.begin_of_audio_id = specials["<|begin_of_audio|>"]
        self.end_of_audio_id = specials["<|end_of_audio|>"]
        self.prefix_ids = [specials["[gMASK]"], specials["<sop>"]]  # added by the official tokenizer
        # HF generate stops on config eos_token_id = [<|endoftext|>, <|user|>, <|observation|>] (REFERENCE §4.4).
        self.stop_ids = frozenset({self.eos_id, self.user_id, self.observation_id})
        odd = [re.escape(s) for s in specials if not re.fullmatch(_CANDIDATE, s)]
        self._special_re = re.compile("|".join([_CANDIDATE, *odd]))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GLMTokenizer:
        path = Path(path)
        model_file, cfg_file = path / "tokenizer.model", path / "tokenizer_config.json"
        for f in (model_file, cfg_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: not a GLM-4-Voice tokenizer directory")
        ranks: dict[bytes, int] = {}
        for n, line in enumerate(model_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as err:
                raise ValueError(f"{model_file}:{n}: expected 'base64-token rank', got {line[:60]!r}") from err
        if len(set(ranks.values())) != len(ranks):
            raise ValueError(f"{model_file}: two tokens share a rank")
        try:
            decoder = json.loads(cfg_file.read_text(encoding="utf-8"))["added_tokens_decoder"]
        except (KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{cfg_file}: no readable 'added_tokens_decoder' ({err})") from err
        specials = {entry["content"]: int(token_id) for token_id, entry in decoder.items()}
        rank_ids = set(ranks.values())
        clash = [i for i in specials.values() if i in rank_ids]
        if clash:
            raise ValueError(f"{cfg_file}: special id {clash[0]} collides with a BPE rank of {model_file}")
        return cls(ranks, specials, path)

    @property
    def vocab_size(self) -> int:
        """One past the largest id this tokenizer can produce."""
        return max(self.num_ranks, max(self.special_ids.values()) + 1)

    def audio_id(self, k: int) -> int:
        if not 0 <= k < self.num_audio_tokens:
            raise ValueError(f"speech token {k} outside 0..{self.num_audio_tokens - 1}")
        return self.audio_offset + k

    def is_audio(self, token_id: int) -> bool:
        return self.audio_offset <= token_id < self.audio_offset + self.num_audio_tokens

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_content

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special strings (`<|user|>`, `<|audio_k|>`, ...) become their ids. No prefix."""
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            token_id = self.special_ids.get(m.group(0))
            if token_id is None:
                continue  # looks like a special but is not one: plain text
            ids += self._enc.encode_ordinary(text[start : m.start()])
            ids.append(token_id)
            start = m.end()
        ids += self._enc.encode_ordinary(text[start:])
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one id; specials give their content; ids outside the tokenizer (LM padding rows) give b''."""
        if 0 <= token_id < self.num_ranks:
            try:
                return self._enc.decode_single_token_bytes(token_id)
            except KeyError:
                return b""
        return self._special_content.get(token_id, "").encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        """Exact concatenation (spaces_between_special_tokens=False, as the official demo decodes)."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def _train_merges(texts: list[str], ranks: dict[bytes, int], num_merges: int) -> None:
    """Greedy byte-pair merges over the pre-split words of `texts`, appended to `ranks` in merge order."""
    words = Counter(tuple(bytes([b]) for b in w.encode("utf-8")) for t in texts for w in regex.findall(GLM4_SPLIT_PATTERN, t))
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
    out_dir: str | Path, *, merges_text: list[str] | None = None, num_audio_tokens: int = 16384, seed: int = 0,
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
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")

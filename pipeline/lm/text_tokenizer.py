"""GLM-4 text tokenizer of glm-4-voice-9b, read from the checkpoint's own files (docs/lm.md).

`tokenizer.model` holds tiktoken BPE ranks (one `base64(token) rank` line each); `tokenizer_config.json`'s
`added_tokens_decoder` holds every special token (role tokens, `[gMASK]`, `<sop>`, `<|begin_of_audio|>`,
reserved slots and the 16,384 `<|audio_k|>`) with its id. Every special id is read from that file, never
assumed: third-party code disagrees on where `<|audio_0|>` sits (docs/lm.md).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import tiktoken

# GLM-4 pre-tokenisation regex (ChatGLM4Tokenizer, docs/lm.md).
GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The GLM-4 control block in its official order; voice adds the two audio brackets (docs/lm.md).
GLM4_SPECIALS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
)
_AUDIO_RE = re.compile(r"<\|audio_(\d+)\|>")
# Candidate special strings in user text; a candidate that is not a known special stays text.
_CANDIDATE = r"<\|[^<>\[\]|\s]*\|>|\[[^<>\[\]|\s]*\]|<[^<>\[\]|\s]*>"


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
        for name in (
            "<|endoftext|>",
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<|begin_of_audio|>",
            "<|end_of_audio|>",
        ):
            if name not in specials:
                raise ValueError(
                    f"{cfg_file}: added_tokens_decoder has no {name!r}; not a GLM-4-Voice tokenizer"
                )
        audio = sorted((int(m.group(1)), i) for s, i in specials.items() if (m := _AUDIO_RE.fullmatch(s)))
        if not audio or audio[0][0] != 0:
            raise ValueError(f"{cfg_file}: no '<|audio_0|>' in added_tokens_decoder")
        self.audio_offset = audio[0][1]  # LM id of <|audio_0|>
        self.num_audio_tokens = len(audio)
        for k, (value, token_id) in enumerate(audio):
            if value != k or token_id != self.audio_offset + k:
                raise ValueError(
                    f"{cfg_file}: audio tokens are not contiguous at <|audio_{value}|> (id {token_id})"
                )
        self.eos_id = specials["<|endoftext|>"]
        self.user_id = specials["<|user|>"]
        self.assistant_id = specials["<|assistant|>"]
        self.system_id = specials["<|system|>"]
        self.observation_id = specials["<|observation|>"]
        self.begin_of_audio_id = specials["<|begin_of_audio|>"]
        self.end_of_audio_id = specials["<|end_of_audio|>"]
        self.prefix_ids = [specials["[gMASK]"], specials["<sop>"]]  # added by the official tokenizer
        # HF generate stops on config eos_token_id = [<|endoftext|>, <|user|>, <|observation|>] (docs/lm.md).
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
                raise ValueError(
                    f"{model_file}:{n}: expected 'base64-token rank', got {line[:60]!r}"
                ) from err
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
        """Bytes of one id; specials give their content; ids outside the tokenizer (LM padding rows) give
        b''."""
        if 0 <= token_id < self.num_ranks:
            try:
                return self._enc.decode_single_token_bytes(token_id)
            except KeyError:
                return b""
        return self._special_content.get(token_id, "").encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        """Exact concatenation (spaces_between_special_tokens=False, as the official demo decodes)."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

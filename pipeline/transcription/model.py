"""Whisper through transformers: a committed turn's 16 kHz audio -> its transcript, piece by piece.

`WhisperForConditionalGeneration.generate` decodes greedily one 30 s window at a time (the encoder's
fixed input: 3000 mel frames of 10 ms). A longer turn is cut into 30 s windows, each conditioned on the
text of the one before (as Whisper's own long-form transcription does); the first on the caller's prompt.
The language is set, or detected once on the first window from the language tokens' logits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    StoppingCriteria,
    StoppingCriteriaList,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)
from transformers.generation.streamers import BaseStreamer

from pipeline.audio_format import MODEL_INPUT_RATE_HZ

log = logging.getLogger(__name__)


def _not_max_length_notice(record: logging.LogRecord) -> bool:
    """Whisper's `generate` sets `max_length` itself beside our `max_new_tokens`, and transformers then
    warns on every call; the notice says nothing about our settings."""
    return not str(record.msg).startswith("Both `max_new_tokens`")


logging.getLogger("transformers.generation.utils").addFilter(_not_max_length_notice)

WINDOW_S = (
    30  # Whisper's encoder input: 3000 mel frames of 10 ms (config max_source_positions x conv stride 2)
)
# New tokens per window: half the decoder's 448 positions, as openai/whisper's `sample_len` default; 30 s of
# fast speech is ~120 tokens, so this only stops a window that repeats itself.
MAX_WINDOW_TOKENS = 224
INIT_TOKENS = 4  # <|startoftranscript|><|lang|><|transcribe|><|notimestamps|>


@dataclass(frozen=True)
class Transcript:
    text: str  # leading space of Whisper's first token removed
    language: str  # ISO-639-1 code, set or detected
    audio_ms: float
    tokens: int  # text tokens Whisper generated
    compute_s: float  # wall time of the whole transcription (bench/bench_transcription.py reads it)


class Stopped(Exception):
    """The transcription was abandoned (the call closed); no event is due."""


class _Pieces(BaseStreamer):
    """Receives each generated id from `generate`; hands the text so far to `on_ids` (the prompt, put
    first, is skipped)."""

    def __init__(self, text_id_limit: int, on_ids: Callable[[list[int]], None]) -> None:
        self.ids: list[int] = []
        self._limit = text_id_limit  # ids from here on are Whisper's special and timestamp tokens
        self._on_ids = on_ids
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        new = [i for i in value.reshape(-1).tolist() if i < self._limit]
        if new:
            self.ids += new
            self._on_ids(self.ids)

    def end(self) -> None:
        pass


class _StopWhen(StoppingCriteria):
    def __init__(self, stop: Callable[[], bool]) -> None:
        self._stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self._stop(), dtype=torch.bool, device=input_ids.device)


class Whisper:
    """A loaded Whisper checkpoint; stateless between calls (every call's state lives in `transcribe`)."""

    def __init__(
        self, name: str, model: WhisperForConditionalGeneration, processor: WhisperProcessor
    ) -> None:
        self.name = name
        self.model = model
        self.processor = processor
        tok = processor.tokenizer
        gen = model.generation_config
        self.eot_id = tok.convert_tokens_to_ids("<|endoftext|>")  # the first special id; text ids are below
        self.prev_id = gen.prev_sot_token_id
        self.id_to_language = {i: token[2:-2] for token, i in gen.lang_to_id.items()}
        self.languages = set(self.id_to_language.values())
        # the prompt and the four start tokens leave MAX_WINDOW_TOKENS for the text
        self.max_prompt_tokens = model.config.max_target_positions - MAX_WINDOW_TOKENS - INIT_TOKENS - 1

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device, dtype: torch.dtype) -> Whisper:
        folder = Path(folder)
        model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
        return cls(folder.name, model, WhisperProcessor.from_pretrained(folder))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.inference_mode()
    def transcribe(
        self,
        pcm16k: np.ndarray,
        *,
        language: str = "",
        prompt: str = "",
        on_text: Callable[[str], None] = lambda text: None,
        stop: Callable[[], bool] = lambda: False,
    ) -> Transcript:
        """The transcript of `pcm16k` ((samples,) float32). `on_text(text_so_far)` after each new token;
        `stop()` is asked every step (True: raise `Stopped`)."""
        t0 = time.monotonic()
        if language and language not in self.languages:
            raise ValueError(f"language {language!r} is not one Whisper knows (ISO-639-1 codes: en, zh, ...)")
        window = WINDOW_S * MODEL_INPUT_RATE_HZ
        windows = [pcm16k[i : i + window] for i in range(0, max(len(pcm16k), 1), window)]
        done_text, previous, tokens = "", prompt, 0
        for index, audio in enumerate(windows):
            features = self._features(audio)  # (1, mel bins, 3000)
            if not language:
                language = self.id_to_language[int(self.model.detect_language(features)[0])]

            def show(ids: list[int], before: str = done_text) -> None:
                on_text((before + self._decode(ids)).lstrip())

            pieces = _Pieces(self.eot_id, show)
            self.model.generate(
                features,
                language=language,
                task="transcribe",
                prompt_ids=self._prompt_ids(previous),
                max_new_tokens=MAX_WINDOW_TOKENS,
                do_sample=False,
                num_beams=1,
                streamer=pieces,
                stopping_criteria=StoppingCriteriaList([_StopWhen(stop)]),
            )
            if stop():
                raise Stopped
            text = self._decode(pieces.ids)
            done_text, previous, tokens = done_text + text, text, tokens + len(pieces.ids)
            log.debug("window %d/%d: %d tokens", index + 1, len(windows), len(pieces.ids))
        audio_ms = 1000.0 * len(pcm16k) / MODEL_INPUT_RATE_HZ
        return Transcript(done_text.strip(), language, audio_ms, tokens, time.monotonic() - t0)

    def _features(self, audio: np.ndarray) -> torch.Tensor:
        features = self.processor.feature_extractor(
            audio, sampling_rate=MODEL_INPUT_RATE_HZ, return_tensors="pt"
        ).input_features
        return features.to(self.device, self.model.dtype)

    def _prompt_ids(self, text: str) -> torch.Tensor | None:
        """<|startofprev|> + the end of `text` that fits (special tokens in it are dropped)."""
        if not text.strip():
            return None
        ids = self.processor.tokenizer.encode(" " + text.strip(), add_special_tokens=False)
        ids = [i for i in ids if i < self.eot_id][-self.max_prompt_tokens :]
        return torch.tensor([self.prev_id, *ids], device=self.device)

    def _decode(self, ids: list[int]) -> str:
        """Text of complete characters: a trailing partial UTF-8 sequence waits for its next token."""
        text = self.processor.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text.rstrip("\ufffd")

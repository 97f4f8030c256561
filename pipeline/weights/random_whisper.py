"""Tiny random Whisper checkpoints in the transformers format (demo weights, tests, benches).

Writes what `WhisperForConditionalGeneration.from_pretrained` and `WhisperProcessor.from_pretrained` read:
config.json, generation_config.json, model.safetensors, tokenizer.json + tokenizer_config.json, and
preprocessor_config.json. Everything is built here, offline: a byte-level BPE trained on a few lines of
English and Chinese, then Whisper's special tokens in Whisper's order (end of text, start of transcript,
one token per language, translate, transcribe, start of LM, start of previous text, no speech, no
timestamps, then the 1501 timestamps 0.00 .. 30.00 s), which is the layout transformers' generation code
derives its ids from (timestamps begin right after the last special token). The weights are random, so
the text is babble; the shapes, the files and the decoding path are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)

from pipeline.transcription.config import WHISPER_LANGUAGES

DEMO_FOLDER = "whisper-random"  # its folder in the demo weights (pipeline/weights/demo.py)
MERGE_TEXT = [
    "Hello! How are you today? I am fine, thank you. What is the weather like in Beijing tomorrow?",
    "Please tell me a story about a cat who lives on the moon, and speak a little slower.",
    "你好，今天天气怎么样？请给我讲一个故事。明天北京会下雨吗？",
]
NUM_MERGES = 200  # a few hundred BPE tokens: enough for words to be single tokens, the vocabulary stays tiny
TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 20 ms steps (the 30 s window's output frames / 1)
MEL_BINS = 128  # large-v3 and large-v3-turbo read 128 mel bins (earlier checkpoints: 80)
WINDOW_FRAMES = 1500  # encoder positions: 30 s of 10 ms mel frames after the stride-2 convolution
TEXT_POSITIONS = 448  # decoder positions of every Whisper checkpoint
DIMS = dict(d_model=64, encoder_layers=2, decoder_layers=2, heads=2, ffn_dim=128)


def special_tokens() -> list[str]:
    """Whisper's special tokens in id order, right after the BPE vocabulary."""
    languages = [f"<|{code}|>" for code in WHISPER_LANGUAGES]
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *languages,
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]


def _write_tokenizer(out: Path) -> WhisperTokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + NUM_MERGES, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(MERGE_TEXT * 4, trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]  # its vocabulary and merges become a WhisperTokenizer's
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = WhisperTokenizer(vocab=trained["vocab"], merges=merges)
    tokenizer.add_tokens(special_tokens(), special_tokens=True)
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(TIMESTAMPS)])
    tokenizer.save_pretrained(out)
    return tokenizer


def _generation_config(tok: WhisperTokenizer) -> GenerationConfig:
    ids = tok.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    config = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=TEXT_POSITIONS,
        begin_suppress_tokens=[ids("Ġ"), eot],  # a transcript starts with neither a bare space nor its end
        # Random weights would emit timestamps and task tokens as readily as text; a trained Whisper does not
        # after <|notimestamps|>, and its own generation config suppresses the task tokens the same way.
        suppress_tokens=[ids(t) for t in special_tokens()[-6:]]
        + list(range(ids("<|notimestamps|>") + 1, len(tok))),
    )
    config.is_multilingual = True
    config.lang_to_id = {f"<|{code}|>": ids(f"<|{code}|>") for code in WHISPER_LANGUAGES}
    config.task_to_id = {"translate": ids("<|translate|>"), "transcribe": ids("<|transcribe|>")}
    config.no_timestamps_token_id = ids("<|notimestamps|>")
    config.prev_sot_token_id = ids("<|startofprev|>")
    return config


def write_random_checkpoint(out: str | Path, *, seed: int = 0, **dims: int) -> Path:
    """A random Whisper in `out` (overwritten); `dims` override `DIMS` (d_model, layers, heads, ffn_dim)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = {**DIMS, **dims}
    tokenizer = _write_tokenizer(out)
    generation = _generation_config(tokenizer)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=MEL_BINS,
        d_model=d["d_model"],
        encoder_layers=d["encoder_layers"],
        decoder_layers=d["decoder_layers"],
        encoder_attention_heads=d["heads"],
        decoder_attention_heads=d["heads"],
        encoder_ffn_dim=d["ffn_dim"],
        decoder_ffn_dim=d["ffn_dim"],
        max_source_positions=WINDOW_FRAMES,
        max_target_positions=TEXT_POSITIONS,
        decoder_start_token_id=generation.decoder_start_token_id,
        bos_token_id=generation.bos_token_id,
        eos_token_id=generation.eos_token_id,
        pad_token_id=generation.pad_token_id,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = generation
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=MEL_BINS).save_pretrained(out)
    return out

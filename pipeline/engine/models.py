"""The engine's models: resolve the weights, load the three stages on the device, warm them up, describe them.

Runs in the engine thread, which owns the device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.decoder.model import SpeechDecoder
from pipeline.decoder.stream import DecoderStream
from pipeline.engine.config import EngineConfig
from pipeline.lm.model import VoiceLM
from pipeline.lm.text_tokenizer import GLMTokenizer
from pipeline.tokenizer.tokenizer import SpeechTokenizer
from pipeline.weights.resolve import ResolvedWeights, resolve_weights, warn_if_not_realtime

log = logging.getLogger(__name__)
TINY_LM_PARAMS = 50_000_000  # below this (demo/test models) CPU work runs on one thread


@dataclass
class Models:
    weights: ResolvedWeights
    speech_tokenizer: SpeechTokenizer
    lm: VoiceLM | None  # None when the LM is served by vLLM (lm_backend = "vllm")
    text: GLMTokenizer
    decoder: SpeechDecoder
    warning: str | None = None


def load_models(cfg: EngineConfig) -> Models:
    """Resolve and load the three stages (in the engine thread: it owns the device)."""
    weights = resolve_weights(cfg)
    t0 = time.monotonic()
    tokenizer = SpeechTokenizer.from_pretrained(weights.tokenizer_dir, device=weights.device, dtype=weights.stage_dtype)
    lm = None
    if cfg.lm_backend != "vllm":  # with vLLM only the text tokenizer of the LM folder is loaded here
        lm = VoiceLM.from_pretrained(
            weights.lm_dir, device=weights.device, dtype=weights.lm_dtype, quantization=weights.quantization or None
        )
    text = lm.tokenizer if lm is not None and lm.tokenizer is not None else GLMTokenizer.from_pretrained(weights.lm_dir)
    decoder = SpeechDecoder.from_pretrained(weights.decoder_dir, device=weights.device, dtype=weights.stage_dtype)
    num_params = sum(p.numel() for p in lm.model.parameters()) if lm is not None else 0
    if weights.device.type == "cpu":
        # Tiny models' ops are dominated by thread hand-offs (a 30-token demo decoder block: 0.23 s on 1
        # thread, 1.3 s on 2 on a busy 2-core machine); torch's setting is process-wide.
        tiny = num_params < TINY_LM_PARAMS
        torch.set_num_threads(cfg.cpu_threads or (1 if tiny else torch.get_num_threads()))
    if lm is not None:
        if weights.device.type == "cuda":
            lm.reserve_caches(cfg.max_calls_batched)  # growing the KV pool later copies it: a pause mid-call
        mode = cfg.decode_mode if cfg.decode_mode != "auto" else ("cudagraph" if weights.device.type == "cuda" else "eager")
        lm.set_decode_mode(mode)
    warning = warn_if_not_realtime(num_params, weights)
    log.info("loaded %s weights on %s in %.1f s", weights.kind, weights.device, time.monotonic() - t0)
    return Models(weights, tokenizer, lm, text, decoder, warning)


def warm_up(m: Models, cfg: EngineConfig) -> None:
    """Run every stage once (kernels, allocator) before reporting ready."""
    t0 = time.monotonic()
    lm, text = m.lm, m.text
    m.speech_tokenizer.tokenize(np.zeros(16000, np.float32))
    if lm is not None:
        _warm_up_lm(lm, text)
    stream = DecoderStream(m.decoder, schedule=(cfg.first_block_tokens, cfg.block_tokens))
    stream.push([0] * cfg.first_block_tokens)
    stream.finish()
    log.info("warm-up done in %.2f s", time.monotonic() - t0)


def _warm_up_lm(lm: VoiceLM, text: GLMTokenizer) -> None:
    cache = lm.new_cache()
    logits = lm.prefill(cache, text.prefix_ids + text.encode("<|user|>\nhello<|assistant|>streaming_transcription\n"))
    try:
        lm.decode_step([cache], [int(torch.argmax(logits))])
    except Exception:  # noqa: BLE001 - a graph/compile mode that fails here must not stop the server
        if lm.decode_mode == "eager":
            raise
        log.exception("decode mode %r failed in warm-up; falling back to eager", lm.decode_mode)
        lm.set_decode_mode("eager")  # the failed step appended nothing to the cache
        lm.decode_step([cache], [int(torch.argmax(logits))])
    cache.release()


def describe(m: Models) -> dict:
    details = m.weights.describe()
    details["output_sample_rate_hz"] = m.decoder.sample_rate_hz
    if m.weights.kind == "demo":
        details["notice"] = ("demo weights: tiny random models, the voice is noise-like babble and the "
                             "reply is scripted; the plumbing is real")  # fmt: skip
    if m.warning:
        details["warning"] = m.warning
    return details

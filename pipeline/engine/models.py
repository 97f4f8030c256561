"""The engine's models: resolve the weights, load the three stages on the device, warm them up, describe them.

Runs in the engine thread, which owns the device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.decoder.graphs import prepare_graphs
from pipeline.decoder.model import SpeechDecoder
from pipeline.decoder.stream import DecoderStream
from pipeline.engine.config import EngineConfig
from pipeline.lm.compiled import compile_decode
from pipeline.lm.kv_cache import slot_bytes
from pipeline.lm.model import VoiceLM
from pipeline.lm.sampling import RowSampling, sample_rows
from pipeline.lm.text_tokenizer import GLMTokenizer
from pipeline.tokenizer.tokenizer import SpeechTokenizer
from pipeline.transcription.config import TranscriptionConfig
from pipeline.transcription.model import Whisper
from pipeline.weights.resolve import (
    ResolvedTranscription,
    ResolvedWeights,
    resolve_transcription,
    resolve_weights,
    warn_if_not_realtime,
)

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
    transcriber: Whisper | None = None  # the transcription stage, when [transcription] turns it on
    transcription: ResolvedTranscription | None = None


def load_models(cfg: EngineConfig, transcription: TranscriptionConfig | None = None) -> Models:
    """Resolve and load the stages (in the engine thread: it owns the device)."""
    weights = resolve_weights(cfg)
    whisper = resolve_transcription(transcription or TranscriptionConfig(enabled="off"), cfg, weights)
    if weights.device.type == "cuda":
        torch.cuda.set_device(weights.device)  # this thread's streams, graphs and "current device" are ours
    t0 = time.monotonic()
    tokenizer = SpeechTokenizer.from_pretrained(
        weights.tokenizer_dir, device=weights.device, dtype=weights.tokenizer_dtype
    )
    lm = None
    if cfg.lm_backend != "vllm":  # with vLLM only the text tokenizer of the LM folder is loaded here
        lm = VoiceLM.from_pretrained(
            weights.lm_dir,
            device=weights.device,
            dtype=weights.lm_dtype,
            quantization=weights.quantization or None,
        )
    text = (
        lm.tokenizer
        if lm is not None and lm.tokenizer is not None
        else GLMTokenizer.from_pretrained(weights.lm_dir)
    )
    decoder = SpeechDecoder.from_pretrained(
        weights.decoder_dir, device=weights.device, dtype=weights.decoder_dtype
    )
    num_params = sum(p.numel() for p in lm.model.parameters()) if lm is not None else 0
    if weights.device.type == "cpu":
        # Tiny models' ops are dominated by thread hand-offs (a 30-token demo decoder block: 0.23 s on 1
        # thread, 1.3 s on 2 on a busy 2-core machine); torch's setting is process-wide.
        tiny = num_params < TINY_LM_PARAMS
        torch.set_num_threads(cfg.cpu_threads or (1 if tiny else torch.get_num_threads()))
    warning = warn_if_not_realtime(num_params, weights)
    transcriber = None
    if whisper is not None:
        transcriber = Whisper.from_pretrained(whisper.folder, device=whisper.device, dtype=whisper.dtype)
    log.info("loaded %s weights on %s in %.1f s", weights.kind, weights.device, time.monotonic() - t0)
    return Models(weights, tokenizer, lm, text, decoder, warning, transcriber, whisper)


def warm_up(m: Models, cfg: EngineConfig) -> None:
    """Run every stage once (kernels, allocator) before reporting ready."""
    t0 = time.monotonic()
    lm, text = m.lm, m.text
    m.speech_tokenizer.tokenize(np.zeros(16000, np.float32))
    if m.transcriber is not None:
        m.transcriber.transcribe(np.zeros(16000, np.float32), language="en", stop=lambda: False)
    if lm is not None:
        plan = memory_plan(m, cfg)
        log.info("%s", plan.describe())
        plan.check()
        lm.reserve_caches(cfg.max_calls, cfg.context_tokens)  # fixed: one slot per admitted call, never grown
        device = m.weights.device
        auto = "compile+cudagraph" if device.type == "cuda" else "eager"
        lm.set_decode_mode(auto if cfg.decode_mode == "auto" else cfg.decode_mode)
        prepare_decode(lm, min(cfg.max_calls_batched, cfg.max_calls), cfg)
        _warm_up_lm(lm, text)
    if (
        m.weights.device.type == "cuda"
    ):  # the decoder's full blocks as CUDA graphs (pipeline/decoder/graphs.py)
        prepare_graphs(m.decoder, cfg.decoder_schedule(), cfg.decoder_prompt_window_tokens or None)
    stream = new_decoder_stream(m.decoder, cfg)
    stream.push([0] * cfg.first_block_tokens)
    stream.finish()
    log.info("warm-up done in %.2f s", time.monotonic() - t0)


def prepare_decode(lm: VoiceLM, max_batch: int, cfg: EngineConfig) -> None:
    """Compile the decode step (bounded by `compile_budget_s`) and capture its graphs, as the mode asks;
    each falls back to the step before it (pipeline/lm/compiled.py), printed."""
    if lm.decode_mode.startswith("compile"):
        report = compile_decode(lm, max_batch, cfg.compile_budget_s, cfg.compile_cache_dir)
        log.info("%s (mode now %s)", report.describe(), lm.decode_mode)
    if "cudagraph" in lm.decode_mode:
        t1 = time.monotonic()
        n = lm.capture_graphs(max_batch)
        log.info(
            "captured %d CUDA graphs of the decode step in %.1f s (mode now %s)",
            n,
            time.monotonic() - t1,
            lm.decode_mode,
        )


def _warm_up_lm(lm: VoiceLM, text: GLMTokenizer) -> None:
    """A short prompt, one decode step, and its logits sampled as a reply's are (top-k / top-p): on an
    H200 the first turn after start spent 142 ms in its 13 text steps before the sampled step was part of
    the warm-up, 106 ms after, as later turns do (docs/gpu.md, run 4b; that run also warmed prefills of
    64-512 tokens, which did not change the first turn's prefill and were dropped)."""
    cache = lm.new_cache()
    logits = lm.prefill(
        cache, text.prefix_ids + text.encode("<|user|>\nhello<|assistant|>streaming_transcription\n")
    )
    try:
        step = lm.decode_step([cache], [int(torch.argmax(logits))])
    except Exception:  # noqa: BLE001 - a graph/compile mode that fails here must not stop the server
        if lm.decode_mode == "eager":
            raise
        log.exception("decode mode %r failed in warm-up; falling back to eager", lm.decode_mode)
        lm.set_decode_mode("eager")  # the failed step appended nothing to the cache
        step = lm.decode_step([cache], [int(torch.argmax(logits))])
    sample_rows(step, [RowSampling(temperature=0.2, top_p=0.8, top_k=50)])
    cache.release()


@dataclass(frozen=True)
class MemoryPlan:
    """Device memory the engine needs at `max_calls` calls, checked against what is free before the KV
    reserve."""

    device: torch.device
    max_calls: int
    context_tokens: int
    weights_bytes: int  # LM + speech tokenizer + decoder parameters, as loaded
    kv_pool_bytes: int  # (max_calls + 1 scratch) LM KV slots of context_tokens each
    tokenizer_bytes: int  # speech tokenizer KV per open segment (one per call) at its 30 s window
    activation_bytes: int  # estimate: a prefill chunk's MLP/attention temporaries + logits + decoder block
    free_bytes: int | None  # device memory free now (CUDA), None on the CPU
    transcription_bytes: int = (
        0  # Whisper's weights (loaded) + one 30 s window's activations (one job at a time)
    )
    transcription_activation_bytes: int = 0  # of those, what is still to allocate

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.kv_pool_bytes
            + self.tokenizer_bytes
            + self.activation_bytes
            + self.transcription_bytes
        )

    def describe(self) -> str:
        gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
        free = f"; free now {gb(self.free_bytes)}" if self.free_bytes is not None else ""
        return (
            f"memory plan on {self.device} for {self.max_calls} calls at {self.context_tokens} tokens: "
            "weights "
            f"{gb(self.weights_bytes)} (loaded) + LM KV pool {gb(self.kv_pool_bytes)} + speech tokenizer KV "
            f"{gb(self.tokenizer_bytes)} + activations ~{gb(self.activation_bytes)} + transcription "
            f"~{gb(self.transcription_bytes)} = {gb(self.total_bytes)}{free}"
        )

    def check(self) -> None:
        """Refuse to start when what is still to allocate does not fit in free device memory."""
        if self.free_bytes is None:
            return
        need = (
            self.kv_pool_bytes
            + self.tokenizer_bytes
            + self.activation_bytes
            + self.transcription_activation_bytes
        )
        if need > self.free_bytes:
            raise MemoryError(
                f"{self.describe()}: the KV pool, tokenizer buffers and activations need {need / 1e9:.1f} GB "
                f"but {self.free_bytes / 1e9:.1f} GB are free. Lower [model] max_calls or context_tokens, "
                "use quantization = 'int4', or [transcription] enabled = 'off'"
            )


def memory_plan(m: Models, cfg: EngineConfig) -> MemoryPlan:
    lm = m.lm
    c = lm.config
    elem = torch.tensor([], dtype=lm.dtype).element_size()
    tokens = min(cfg.context_tokens, c.seq_length)
    kv_pool = (cfg.max_calls + 1) * slot_bytes(c.num_layers, c.kv_groups, c.head_dim, tokens, elem)
    tc = m.speech_tokenizer.config
    tok_elem = next(m.speech_tokenizer.encoder.parameters()).element_size()
    tokenizer = cfg.max_calls * 2 * tc.num_layers * tc.max_positions * tc.d_model * tok_elem
    weights = sum(
        p.numel() * p.element_size()
        for mod in (lm.model, m.speech_tokenizer.encoder, m.decoder.flow, m.decoder.hift)
        for p in mod.parameters()
    )
    rows = min(cfg.max_calls_batched, cfg.max_calls)
    # A 512-token prefill chunk's gate/up output (2 x ffn) and its activation, two layers' worth live at once;
    # logits of the largest decode batch (float32, x3: sampling's sort and softmax); decoder block: ~256 MB.
    chunk = 512 * 2 * c.ffn_hidden_size * elem * 4 + 512 * (c.num_heads // c.kv_groups) * tokens * 4
    activations = chunk + 3 * rows * c.vocab_size * 4 + 256 * 2**20
    whisper = m.transcriber
    whisper_activations = transcription_activation_bytes(whisper) if whisper is not None else 0
    whisper_bytes = whisper.parameter_bytes() + whisper_activations if whisper is not None else 0
    free = None
    if m.weights.device.type == "cuda":  # the provisional pool is freed by the reserve: count it as free
        free = torch.cuda.mem_get_info(m.weights.device)[0] + (lm.pool.capacity + 1) * lm.pool.bytes_per_slot
    return MemoryPlan(
        m.weights.device,
        cfg.max_calls,
        tokens,
        weights,
        kv_pool,
        tokenizer,
        activations,
        free,
        transcription_bytes=whisper_bytes,
        transcription_activation_bytes=whisper_activations,
    )


def transcription_activation_bytes(w: Whisper) -> int:
    """One 30 s window (one job at a time): the encoder's attention scores and MLP hidden over its 1500
    positions, and the decoder's self and cross-attention caches."""
    c = w.model.config
    elem = next(w.model.parameters()).element_size()
    positions, text = c.max_source_positions, c.max_target_positions
    encoder = (
        c.encoder_attention_heads * positions * positions * elem + 2 * positions * c.encoder_ffn_dim * elem
    )
    caches = c.decoder_layers * 2 * (positions + text) * c.d_model * elem
    return encoder + caches


def describe(m: Models) -> dict:
    details = m.weights.describe()
    details["output_sample_rate_hz"] = m.decoder.sample_rate_hz
    if m.weights.kind == "demo":
        details["notice"] = (
            "demo weights: tiny random models, the voice is noise-like babble and the "
            "reply is scripted; the plumbing is real"
        )
    if m.warning:
        details["warning"] = m.warning
    details["transcription"] = m.transcription.describe() if m.transcription is not None else "off"
    return details


def new_decoder_stream(decoder: SpeechDecoder, cfg: EngineConfig) -> DecoderStream:
    """A reply's decoder stream with the engine's schedule and prompt window (docs/decoder.md)."""
    window = cfg.decoder_prompt_window_tokens or None
    return DecoderStream(decoder, schedule=cfg.decoder_schedule(), max_prompt_tokens=window)

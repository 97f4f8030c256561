"""Settings of the GLM-4-Voice engine (the `[model]` section of config.toml). Torch-free.

The server composes this into its config; env overrides use GLM4VOICE_MODEL_<KEY>.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    weights_dir: str = ""  # holds glm-4-voice-{tokenizer,9b,decoder}/; "" = demo weights
    tokenizer_dir: str = ""  # overrides weights_dir/glm-4-voice-tokenizer
    lm_dir: str = ""  # overrides weights_dir/glm-4-voice-9b
    decoder_dir: str = ""  # overrides weights_dir/glm-4-voice-decoder
    demo_weights_dir: str = "demo_weights"  # written on first start when no real weights are configured
    require_weights: bool = False  # refuse to start on demo weights
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "float32", "bfloat16", "float16"
    quantization: str = ""  # "" or "int4" (bitsandbytes NF4, as the official server's --dtype int4)
    max_calls_batched: int = (
        16  # LM decode-step rows (calls sharing one forward) and decoder blocks per batch
    )
    max_calls: int = (
        16  # LM KV slots reserved at start, one per open call (the server passes [limits].max_calls)
    )
    first_block_tokens: int = 10  # speech tokens of the first decoder block (paper: 10): time to first audio
    max_block_tokens: int = (
        80  # later blocks double up to this (10, 20, 40, 80): cost per block stays bounded
    )
    decoder_prompt_window_tokens: int = (
        50  # earlier speech tokens the decoder conditions on; 0 = all (official)
    )

    def decoder_schedule(self) -> tuple[int, ...]:
        """Speech tokens per decoder block, the last repeating: doubling from the first (docs/decoder.md)."""
        sizes = [self.first_block_tokens]
        while sizes[-1] * 2 <= self.max_block_tokens:
            sizes.append(sizes[-1] * 2)
        return tuple(sizes)

    max_new_tokens: int = 2000  # per reply (official demo UI default)
    context_tokens: int = 8192  # LM context (config seq_length); oldest whole turns dropped past it
    stream_lead_ms: int = (
        1000  # a stream this far ahead of its playback lets a new turn's first audio go first
    )
    prefill_chunk_tokens: int = (
        256  # prompt tokens per call per engine step: other calls' steps run between chunks
    )
    max_pending_items: int = (
        64  # user messages waiting for a reply, per call; past it the turn fails (input_too_large)
    )
    max_pending_tokens: int = 8192  # their prompt tokens, per call; past it the turn fails (input_too_large)
    decode_mode: str = (
        "auto"  # LM decode step: auto (compile+cudagraph on CUDA, else eager) | eager | compile | cudagraph
    )
    compile_budget_s: float = (
        120.0  # bound of the decode step's compile at warm-up: a cold cache compiles every kernel once, and
        # batch buckets not reached in time keep the eager step (docs/lm.md, Compiled decode step)
    )
    compile_cache_dir: str = (
        ""  # inductor's on-disk artefacts (TORCHINDUCTOR_CACHE_DIR); "" = torch's default
    )
    cpu_threads: int = (
        0  # torch intra-op threads on CPU; 0 = auto (1 for a LM under 50 M params, else torch default)
    )
    lm_backend: str = (
        "local"  # "local" (the LM on this engine's device) | "vllm" (streamed from [vllm], not loaded here)
    )


@dataclass(frozen=True)
class VLLMConfig:
    """The `[vllm]` section: the vLLM deployment that serves the LM when `[model] lm_backend = "vllm"`."""

    url: str = "http://127.0.0.1:8000"  # vLLM's OpenAI-compatible server (http or https, path prefix kept)
    api_key: str = ""  # vLLM's --api-key, sent as a bearer token; prefer GLM4VOICE_VLLM_API_KEY
    model: str = ""  # its --served-model-name; "" = the only model it serves
    connect_timeout_s: float = 5.0  # TCP connect and short requests (readiness probe)
    read_timeout_s: float = 60.0  # longest silence inside a reply's stream (queueing and prefill included)
    probe_interval_s: float = 2.0  # s between readiness probes while vLLM is not ready (recovery by itself)

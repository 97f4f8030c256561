"""GLM-4-Voice-9B language model on transformers' native `GlmForCausalLM`, with a gpt-fast style hot path.

transformers holds the weights and the simple full-sequence forward (`logits`); the streaming path runs
the same layers' submodules (norms, projections, MLP, its RoPE) against a static KV pool shared by all
calls: `prefill` appends a call's new tokens, `decode_step` advances several calls of different lengths
by one token in one forward (fixed shapes per (batch, length bucket), no host sync); pipeline/lm/sampling.py picks.
Conversion details: `pipeline/lm/convert.py`; the KV pool: `pipeline/lm/kv_cache.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

from pipeline.lm.convert import LMConfig, load_glm_model
from pipeline.lm.kv_cache import ContextFullError, KVPool, LMCache
from pipeline.lm.sampling import sample_logits
from pipeline.lm.text_tokenizer import GLMTokenizer

__all__ = ["VoiceLM", "LMConfig", "LMCache", "ContextFullError"]
log = logging.getLogger(__name__)

PREFILL_CHUNK_TOKENS = 512  # bounds the (heads-per-group * chunk, context) mask of one prefill chunk
MIN_ATTEND_TOKENS = 256  # smallest key-length bucket of a decode step (buckets double up to seq_length)
DECODE_MODES = ("eager", "compile", "cudagraph", "compile+cudagraph")

KVFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (new k, new v) -> (all k, all v) to attend to


class VoiceLM:
    """Shared, stateless model; per-call state lives in `LMCache` objects from `new_cache()`."""

    def __init__(self, model: torch.nn.Module, config: LMConfig, tokenizer: GLMTokenizer | None,
                 device: torch.device, dtype: torch.dtype, quantization: str | None) -> None:  # fmt: skip
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.device, self.dtype, self.quantization = device, dtype, quantization
        self.pool = KVPool(config.num_layers, config.kv_groups, config.head_dim, config.seq_length, device, dtype)
        self.decode_mode = "eager"
        self._decode_fn: Callable[..., Tensor] = self._decode_forward
        self._graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], Tensor]] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        quantization: str | None = None) -> VoiceLM:  # fmt: skip
        """Load an official glm-4-voice-9b dir (ChatGLM config.json + safetensors shards [+ tokenizer])."""
        path = Path(path)
        device = torch.device(device)
        config = LMConfig.from_chatglm_json(path / "config.json")
        if quantization not in (None, "", "int4"):
            raise ValueError(f"quantization {quantization!r}: expected None or 'int4'")
        int4 = quantization == "int4"
        if int4:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as err:
                raise ImportError(f"{path}: quantization='int4' needs bitsandbytes (pip install bitsandbytes)") from err
        # bf16 is what the official server runs (§3.2). On a CPU float32: the parity precision, and CPUs
        # without AMX run bf16 matmuls slower (BASELINE.md). int4 computes in bf16, as the official server.
        if int4 and dtype not in (None, torch.bfloat16):
            raise ValueError(f"{path}: quantization='int4' computes in bfloat16, got dtype={dtype}")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" or int4 else torch.float32)
        tokenizer = None
        if (path / "tokenizer.model").is_file():
            tokenizer = GLMTokenizer.from_pretrained(path)
            if tokenizer.vocab_size > config.vocab_size:
                raise ValueError(f"{path / 'tokenizer_config.json'}: ids up to {tokenizer.vocab_size - 1} do not fit "
                                 f"padded_vocab_size {config.vocab_size} of {path / 'config.json'} (vocab mismatch)")  # fmt: skip
        model = load_glm_model(path, config, device, dtype, int4)
        return cls(model, config, tokenizer, device, dtype, "int4" if int4 else None)

    @property
    def max_context_tokens(self) -> int:
        return self.config.seq_length

    # --- full-sequence path (transformers' own forward) ---------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: list[int]) -> Tensor:
        """Logits (T, V) float32 at every position, from transformers' GlmForCausalLM forward."""
        ids = torch.tensor([input_ids], device=self.device)
        return self.model(input_ids=ids, use_cache=False).logits[0].float()

    # --- streaming path --------------------------------------------------------------------------------------
    def new_cache(self) -> LMCache:
        return LMCache(self.pool, self.pool.acquire())

    def reserve_caches(self, n: int) -> None:
        """Preallocate KV for `n` concurrent calls (each `pool.bytes_per_slot`: 320 MiB bf16 at full size)."""
        self.pool.reserve(n)

    @torch.inference_mode()
    def prefill(self, cache: LMCache, ids: list[int]) -> Tensor:
        """Append `ids` to the cache; logits (V,) float32 of the last position."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        if cache.slot < 0:
            raise ValueError("prefill on a released cache")
        if cache.length + len(ids) > self.max_context_tokens:
            raise ContextFullError(f"{cache.length} cached + {len(ids)} new tokens pass the "
                                   f"{self.max_context_tokens}-token context")  # fmt: skip
        hidden = None
        for start in range(0, len(ids), PREFILL_CHUNK_TOKENS):
            chunk = ids[start : start + PREFILL_CHUNK_TOKENS]
            hidden = self._prefill_forward(cache.slot, cache.length, torch.tensor(chunk, device=self.device))
            cache.token_ids.extend(chunk)
        return self.model.lm_head(self.model.model.norm(hidden[-1:]))[0].float()

    @torch.inference_mode()
    def decode_step(self, caches: Sequence[LMCache], token_ids: Sequence[int]) -> Tensor:
        """Feed one token to each cache (one batched forward); next-token logits (B, V) float32."""
        if len(caches) != len(token_ids) or not caches:
            raise ValueError("decode_step needs one token per cache")
        if len({c.slot for c in caches}) != len(caches) or min(c.slot for c in caches) < 0:
            raise ValueError("decode_step got the same cache twice, or a released cache")
        lengths = [c.length for c in caches]
        if max(lengths) + 1 > self.max_context_tokens:
            raise ContextFullError(f"a cache holds {max(lengths)} tokens: the {self.max_context_tokens}-token context is full")
        attend = MIN_ATTEND_TOKENS
        while attend < max(lengths) + 1:
            attend *= 2
        attend = min(attend, self.max_context_tokens)
        ids = torch.tensor(token_ids, device=self.device)
        slots = torch.tensor([c.slot for c in caches], device=self.device)
        pos = torch.tensor(lengths, device=self.device)
        logits = self._run_decode(ids, slots, pos, attend)
        for c, t in zip(caches, token_ids, strict=True):
            c.token_ids.append(int(t))
        return logits

    def generate(self, input_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop_ids: frozenset[int] = frozenset(), seed: int | None = None) -> list[int]:  # fmt: skip
        """New ids after `input_ids` through prefill + decode steps (the streaming path); stops after a stop id."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        cache = self.new_cache()
        try:
            logits = self.prefill(cache, list(input_ids))[None]
            out: list[int] = []
            while len(out) < max_new_tokens:
                token = int(sample_logits(logits, temperature, top_p, top_k, generator)[0])
                out.append(token)
                if token in stop_ids or len(out) == max_new_tokens:
                    break
                logits = self.decode_step([cache], [token])
            return out
        finally:
            cache.release()

    # --- the layers ----------------------------------------------------------------------------------------
    def _rope(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.model.rotary_emb(x, positions)  # cos, sin: (B, T, rotary dims) in x's dtype

    def _layer(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, kv: KVFn, mask: Tensor) -> Tensor:
        """One decoder layer on x (B, T, H); `kv` stores the new K/V and returns what to attend to.

        mask: (B or 1, 1, T, S) bool, True = attend. GQA without copying K/V: the r = heads/groups query
        heads of a group are folded into the query-length axis, so each group attends once.
        """
        layer = self.model.model.layers[i]
        attn, cfg = layer.self_attn, self.config
        B, T, _ = x.shape
        G, r, D = cfg.kv_groups, cfg.num_heads // cfg.kv_groups, cfg.head_dim
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(B, T, -1, D).transpose(1, 2)  # (B, Hq, T, D)
        k = attn.k_proj(h).view(B, T, -1, D).transpose(1, 2)  # (B, G, T, D)
        v = attn.v_proj(h).view(B, T, -1, D).transpose(1, 2)  # (B, G, T, D)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # half of each head, interleaved pairs
        k_all, v_all = kv(k, v)  # (B, G, S, D)
        q = q.reshape(B, G, r * T, D)  # query head g*r + j -> group g (REFERENCE §3.2)
        group_mask = mask.unsqueeze(2).expand(-1, -1, r, -1, -1).reshape(mask.shape[0], 1, r * T, -1)
        o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=group_mask)  # (B, G, r*T, D)
        o = o.reshape(B, G * r, T, D).transpose(1, 2).reshape(B, T, G * r * D)  # (B, T, Hq*D)
        x = x + attn.o_proj(o)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _prefill_forward(self, slot: int, start: int, ids: Tensor) -> Tensor:
        """ids (T,) at positions start..start+T-1 of `slot`; returns hidden (T, H) before the final norm."""
        T = ids.shape[0]
        end = start + T
        x = self.model.model.embed_tokens(ids)[None]  # (1, T, H)
        positions = torch.arange(start, end, device=self.device)
        cos, sin = self._rope(x, positions[None])
        mask = (torch.arange(end, device=self.device)[None] <= positions[:, None])[None, None]  # (1, 1, T, end)
        for i in range(self.config.num_layers):
            k_buf, v_buf = self.pool.k[i], self.pool.v[i]

            def kv(k: Tensor, v: Tensor, k_buf: Tensor = k_buf, v_buf: Tensor = v_buf) -> tuple[Tensor, Tensor]:
                k_buf[slot, :, start:end] = k[0]
                v_buf[slot, :, start:end] = v[0]
                return k_buf[slot : slot + 1, :, :end], v_buf[slot : slot + 1, :, :end]  # views, no copy

            x = self._layer(i, x, cos, sin, kv, mask)
        return x[0]

    def _decode_forward(self, ids: Tensor, slots: Tensor, pos: Tensor, attend: int) -> Tensor:
        """ids, slots, pos: (B,). One token per row at its own position; logits (B, V) float32.

        Fixed shapes for a given (B, attend); only device ops (no .item()), so it can be compiled/graphed.
        """
        x = self.model.model.embed_tokens(ids)[:, None]  # (B, 1, H)
        cos, sin = self._rope(x, pos[:, None])
        mask = (torch.arange(attend, device=ids.device)[None] <= pos[:, None])[:, None, None]  # (B, 1, 1, S)
        for i in range(self.config.num_layers):
            k_buf, v_buf = self.pool.k[i], self.pool.v[i]

            def kv(k: Tensor, v: Tensor, k_buf: Tensor = k_buf, v_buf: Tensor = v_buf) -> tuple[Tensor, Tensor]:
                k_buf[slots, :, pos] = k[:, :, 0]  # (B, G, D) written at each row's own position
                v_buf[slots, :, pos] = v[:, :, 0]
                return k_buf[slots, :, :attend], v_buf[slots, :, :attend]  # (B, G, S, D)

            x = self._layer(i, x, cos, sin, kv, mask)
        return self.model.lm_head(self.model.model.norm(x[:, 0])).float()

    # --- compiled / graphed decode ---------------------------------------------------------------------------
    def set_decode_mode(self, mode: str) -> None:
        """'eager'; 'compile' (torch.compile, no graphs); 'cudagraph' (manual CUDA graph per (B, bucket));
        'compile+cudagraph' (torch.compile mode='reduce-overhead'). The graph modes need CUDA."""
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode {mode!r}: expected one of {DECODE_MODES}")
        if "cudagraph" in mode and self.device.type != "cuda":
            raise ValueError(f"decode mode {mode!r} needs a CUDA device, the model is on {self.device}")
        self.decode_mode = mode
        self._graphs.clear()
        # One compiled variant per (batch size, length bucket): 16 x 6 at full size, past dynamo's default 8.
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 128)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 512)
        if mode == "compile":
            self._decode_fn = torch.compile(self._decode_forward, dynamic=False)
        elif mode == "compile+cudagraph":
            self._decode_fn = torch.compile(self._decode_forward, mode="reduce-overhead", dynamic=False)
        else:
            self._decode_fn = self._decode_forward

    def _run_decode(self, ids: Tensor, slots: Tensor, pos: Tensor, attend: int) -> Tensor:
        if self.decode_mode != "cudagraph":
            out = self._decode_fn(ids, slots, pos, attend)
            return out.clone() if self.decode_mode == "compile+cudagraph" else out
        key = (ids.shape[0], attend, self.pool.generation)
        if any(k[2] != self.pool.generation for k in self._graphs):
            self._graphs.clear()  # the pool was reallocated: free graphs that hold the old buffers
        if key not in self._graphs:
            self._graphs[key] = self._capture(ids, slots, pos, attend)
        graph, static_in, static_out = self._graphs[key]
        for buf, value in zip(static_in, (ids, slots, pos), strict=True):
            buf.copy_(value, non_blocking=True)
        graph.replay()
        return static_out.clone()

    def _capture(self, ids: Tensor, slots: Tensor, pos: Tensor, attend: int) -> tuple:
        """Record one decode step. Warm-up runs write the same K/V the real step writes (idempotent)."""
        static_in = (ids.clone(), slots.clone(), pos.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_forward(*static_in, attend)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._decode_forward(*static_in, attend)
        return graph, static_in, static_out

"""GLM-4-Voice-9B language model on transformers' native `GlmForCausalLM`, with a gpt-fast style hot path.

transformers holds the weights and the simple full-sequence forward (`logits`); the streaming path runs the
same layers' submodules (norms, projections, MLP, its RoPE) against a static KV pool shared by all calls:
`prefill` appends a call's new tokens, `decode_step` advances several calls of different lengths by one token
in one forward (fixed shapes per (batch, length bucket), no host sync); pipeline/lm/sampling.py picks.
Conversion details: `pipeline/lm/convert.py`; the KV pool: `pipeline/lm/kv_cache.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

from pipeline.lm.convert import LMConfig, load_glm_model
from pipeline.lm.kv_cache import ContextFullError, KVPool, LMCache, PoolFullError
from pipeline.lm.sampling import sample_logits
from pipeline.lm.text_tokenizer import GLMTokenizer

__all__ = ["VoiceLM", "LMConfig", "LMCache", "ContextFullError", "PoolFullError"]
log = logging.getLogger(__name__)

PREFILL_CHUNK_TOKENS = 512  # bounds the (heads-per-group * chunk, context) mask of one prefill chunk
# The prefill's attention backends: every one but cuDNN's. On an H200 the first prefill of each new prompt
# length spent its time in this attention call (the first turn after start: 1.0-1.8 s to prefill a prompt
# that later turns of the same length prefilled in 30-80 ms, after warm-up prefills of other lengths), which
# is what a per-shape plan build does; cuDNN's attention builds one per shape. Not yet measured with this
# list (docs/gpu.md, run 3). The math backend is last: some backend always applies.
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MIN_ATTEND_TOKENS = 256  # smallest key-length bucket of a decode step (buckets double up to the slot size)
DEFAULT_SLOTS = 4  # KV slots before the engine reserves its own (tests, benches, generate())
# A decode step attends over the whole pool (views, no copy) instead of gathering its rows' KV when
# gathering would move more bytes: a gather reads and writes B rows then SDPA reads them again (3 B row
# reads), the whole pool costs one read of every slot.
GATHER_COST_FACTOR = 3
DECODE_MODES = ("eager", "compile", "cudagraph", "compile+cudagraph")  # compile: pipeline/lm/compiled.py

AttendFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]  # (layer, q, new k, new v) -> attention output


def attention_inputs(
    layer: torch.nn.Module, x: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """A layer's input norm, q/k/v projections and RoPE on x (B, T, H).

    Returns q (B, Hq, T, D), k and v (B, G, T, D)."""
    attn = layer.self_attn
    B, T, _ = x.shape
    D = attn.head_dim
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(B, T, -1, D).transpose(1, 2)  # (B, Hq, T, D)
    k = attn.k_proj(h).view(B, T, -1, D).transpose(1, 2)  # (B, G, T, D)
    v = attn.v_proj(h).view(B, T, -1, D).transpose(1, 2)  # (B, G, T, D)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)  # half of each head, interleaved pairs
    return q, k, v


def layer_output(layer: torch.nn.Module, x: Tensor, o: Tensor) -> Tensor:
    """The rest of a layer after attention: output projection, residual, post-attention norm, MLP,
    residual."""
    x = x + layer.self_attn.o_proj(o)
    return x + layer.mlp(layer.post_attention_layernorm(x))


@dataclass(frozen=True)
class Regions:
    """What a layer computes around its attention: transformers' modules as they are (EAGER_REGIONS) or the
    same functions compiled by inductor for one decode batch bucket (pipeline/lm/compiled.py)."""

    attention_inputs: Callable[..., tuple[Tensor, Tensor, Tensor]]
    layer_output: Callable[..., Tensor]


EAGER_REGIONS = Regions(attention_inputs, layer_output)


class VoiceLM:
    """Shared, stateless model; per-call state lives in `LMCache` objects from `new_cache()`."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: LMConfig,
        tokenizer: GLMTokenizer | None,
        device: torch.device,
        dtype: torch.dtype,
        quantization: str | None,
    ) -> None:
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.device, self.dtype, self.quantization = device, dtype, quantization
        self.decode_mode = "eager"
        self.step_regions: dict[
            int, Regions
        ] = {}  # batch bucket -> compiled regions (pipeline/lm/compiled.py)
        self._graphs: dict[
            tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]
        ] = {}  # (rows, attend) -> graph
        self._graphs_failed = False  # a capture failed once: graphs stay off (logged once)
        self._graph_miss_logged = False
        self.reserve_caches(DEFAULT_SLOTS)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        quantization: str | None = None,
    ) -> VoiceLM:
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
                raise ImportError(
                    f"{path}: quantization='int4' needs bitsandbytes (pip install bitsandbytes)"
                ) from err
        # bf16 is what the official server runs (docs/lm.md). On a CPU float32: the parity precision, and CPUs
        # without AMX run bf16 matmuls slower (docs/baseline.md). int4 computes in bf16, as the official
        # server.
        if int4 and dtype not in (None, torch.bfloat16):
            raise ValueError(f"{path}: quantization='int4' computes in bfloat16, got dtype={dtype}")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" or int4 else torch.float32)
        tokenizer = None
        if (path / "tokenizer.model").is_file():
            tokenizer = GLMTokenizer.from_pretrained(path)
            if tokenizer.vocab_size > config.vocab_size:
                raise ValueError(
                    f"{path / 'tokenizer_config.json'}: ids up to {tokenizer.vocab_size - 1} do not fit "
                    f"padded_vocab_size {config.vocab_size} of {path / 'config.json'} (vocab mismatch)"
                )
        model = load_glm_model(path, config, device, dtype, int4)
        return cls(model, config, tokenizer, device, dtype, "int4" if int4 else None)

    @property
    def max_context_tokens(self) -> int:
        """Tokens one call's cache holds: min(context_tokens given to `reserve_caches`, config seq_length)."""
        return self.pool.max_tokens

    # --- full-sequence path (transformers' own forward) ---------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: list[int]) -> Tensor:
        """Logits (T, V) float32 at every position, from transformers' GlmForCausalLM forward."""
        ids = torch.tensor([input_ids], device=self.device)
        return self.model(input_ids=ids, use_cache=False).logits[0].float()

    # --- streaming path -------------------------------------------------------------------------------------
    def new_cache(self) -> LMCache:
        return LMCache(self.pool, self.pool.acquire())

    def reserve_caches(self, n: int, context_tokens: int | None = None) -> None:
        """A fixed pool of `n` caches of min(context_tokens, seq_length) tokens each, allocated now, never
        grown (`pool.bytes_per_slot` each: 320 MiB bf16 at 8192 tokens, full size); drops captured graphs."""
        if getattr(self, "pool", None) is not None and self.pool.in_use:
            raise RuntimeError(f"reserve_caches({n}) while {self.pool.in_use} caches are held")
        tokens = min(context_tokens or self.config.seq_length, self.config.seq_length)
        self.pool = None
        self._graphs.clear()
        c = self.config
        self.pool = KVPool(c.num_layers, c.kv_groups, c.head_dim, tokens, self.device, self.dtype, slots=n)
        # Decode inputs (ids, slots, positions) staged in host memory (pinned on CUDA), copied without a
        # sync into one persistent device buffer: the graphs' static inputs are slices of it.
        rows = batch_bucket(n)
        pinned = self.device.type == "cuda"
        self._stage_host = torch.zeros((3, rows), dtype=torch.long, pin_memory=pinned)
        self._stage_np = self._stage_host.numpy()
        self._stage = torch.zeros((3, rows), dtype=torch.long, device=self.device)
        self._staged: torch.cuda.Event | None = None

    @torch.inference_mode()
    def prefill(self, cache: LMCache, ids: list[int]) -> Tensor:
        """Append `ids` to the cache; logits (V,) float32 of the last position."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        if cache.slot < 0:
            raise ValueError("prefill on a released cache")
        if cache.length + len(ids) > self.max_context_tokens:
            raise ContextFullError(
                f"{cache.length} cached + {len(ids)} new tokens pass the "
                f"{self.max_context_tokens}-token context"
            )
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
            raise ContextFullError(
                f"a cache holds {max(lengths)} tokens: the {self.max_context_tokens}-token context is full"
            )
        attend = MIN_ATTEND_TOKENS
        while attend < max(lengths) + 1:
            attend *= 2
        attend = min(attend, self.max_context_tokens)
        B, rows = len(caches), batch_bucket(len(caches))
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's copy has read the host buffer
        host = self._stage_np
        host[0, :B], host[1, :B], host[2, :B] = token_ids, [c.slot for c in caches], lengths
        host[0, B:rows], host[1, B:rows], host[2, B:rows] = 0, self.pool.scratch_slot, 0  # padding rows
        self._stage[:, :rows].copy_(self._stage_host[:, :rows], non_blocking=True)
        if self.device.type == "cuda":
            self._staged = torch.cuda.Event()
            self._staged.record(torch.cuda.current_stream(self.device))
        logits = self._run_decode(rows, attend)[:B]
        for c, t in zip(caches, token_ids, strict=True):
            c.token_ids.append(int(t))
        return logits

    def generate(
        self,
        input_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop_ids: frozenset[int] = frozenset(),
        seed: int | None = None,
    ) -> list[int]:
        """New ids after `input_ids` through prefill + decode steps (the streaming path); stops after a stop
        id."""
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

    def _layer(
        self, i: int, x: Tensor, cos: Tensor, sin: Tensor, attend: AttendFn, regions: Regions
    ) -> Tensor:
        """One decoder layer on x (B, T, H); `attend` stores the new K/V and attends; `regions` computes the
        rest (transformers' modules, or their compiled form: pipeline/lm/compiled.py).

        GQA without copying K/V: the r = heads/groups query heads of a group are folded into the
        query-length axis, so each group attends once.
        """
        layer, cfg = self.model.model.layers[i], self.config
        B, T, _ = x.shape
        G, r, D = cfg.kv_groups, cfg.num_heads // cfg.kv_groups, cfg.head_dim
        q, k, v = regions.attention_inputs(layer, x, cos, sin)  # (B, Hq, T, D), (B, G, T, D) x 2
        q = q.reshape(B, G, r * T, D)  # query head g*r + j -> group g (ChatGLM grouping, docs/lm.md)
        o = attend(i, q, k, v)  # (B, G, r*T, D)
        o = o.reshape(B, G * r, T, D).transpose(1, 2).reshape(B, T, G * r * D)  # (B, T, Hq*D)
        return regions.layer_output(layer, x, o)

    def _prefill_forward(self, slot: int, start: int, ids: Tensor) -> Tensor:
        """ids (T,) at positions start..start+T-1 of `slot`; returns hidden (T, H) before the final norm."""
        T = ids.shape[0]
        end = start + T
        r = self.config.num_heads // self.config.kv_groups
        x = self.model.model.embed_tokens(ids)[None]  # (1, T, H)
        positions = torch.arange(start, end, device=self.device)
        cos, sin = self._rope(x, positions[None])
        mask = torch.arange(end, device=self.device)[None] <= positions[:, None]  # (T, end)
        mask = mask[None, None, None].expand(1, 1, r, T, end).reshape(1, 1, r * T, end)  # per folded head

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k_buf, v_buf = self.pool.k[i], self.pool.v[i]
            k_buf[slot, :, start:end] = k[0]
            v_buf[slot, :, start:end] = v[0]
            keys, values = k_buf[slot : slot + 1, :, :end], v_buf[slot : slot + 1, :, :end]  # views, no copy
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

        with sdpa_kernel(PREFILL_ATTENTION):
            for i in range(self.config.num_layers):
                x = self._layer(i, x, cos, sin, attend, EAGER_REGIONS)
        return x[0]

    def whole_pool_attention(self, rows: int) -> bool:
        """Attend over every slot (views) rather than gather `rows` slots' KV (copies): fewer bytes moved."""
        return GATHER_COST_FACTOR * rows >= self.pool.capacity + 1

    def _decode_forward(
        self, ids: Tensor, slots: Tensor, pos: Tensor, attend_tokens: int, regions: Regions | None = None
    ) -> Tensor:
        """ids, slots, pos: (B,). One token per row at its own position; logits (B, V) float32.

        Fixed shapes for a given (B, attend_tokens); only device ops (no .item()), so it can be graphed.
        `regions`: default the batch bucket's compiled regions when compiled (`step_regions`), else eager.
        Padding rows point at the pool's scratch slot. Two attention layouts, same maths: gather the rows'
        KV (B, G, S, D) (copies, cheap for a few rows), or scatter the queries into a (slots, G, r, D) grid
        and attend over the pool's own buffers (views: no KV copy, every slot read once).
        """
        S = attend_tokens
        regions = regions or self.step_regions.get(ids.shape[0], EAGER_REGIONS)
        x = self.model.model.embed_tokens(ids)[:, None]  # (B, 1, H)
        cos, sin = self._rope(x, pos[:, None])
        whole_pool = self.whole_pool_attention(ids.shape[0])
        if whole_pool:
            P = self.pool.capacity + 1
            pool_pos = torch.zeros(P, dtype=pos.dtype, device=pos.device).index_put_(
                (slots,), pos
            )  # others: key 0
            mask = (torch.arange(S, device=ids.device)[None] <= pool_pos[:, None])[
                :, None, None
            ]  # (P, 1, 1, S)
        else:
            mask = (torch.arange(S, device=ids.device)[None] <= pos[:, None])[:, None, None]  # (B, 1, 1, S)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k_buf, v_buf = self.pool.k[i], self.pool.v[i]
            k_buf[slots, :, pos] = k[:, :, 0]  # (B, G, D) written at each row's own position
            v_buf[slots, :, pos] = v[:, :, 0]
            if not whole_pool:
                keys, values = k_buf[slots, :, :S], v_buf[slots, :, :S]  # (B, G, S, D) copies
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            grid = q.new_zeros((k_buf.shape[0], *q.shape[1:])).index_put_((slots,), q)  # (P, G, r, D)
            out = F.scaled_dot_product_attention(grid, k_buf[:, :, :S], v_buf[:, :, :S], attn_mask=mask)
            return out[slots]  # (B, G, r, D)

        for i in range(self.config.num_layers):
            x = self._layer(i, x, cos, sin, attend, regions)
        return self.model.lm_head(self.model.model.norm(x[:, 0])).float()

    # --- compiled / graphed decode --------------------------------------------------------------------------
    def set_decode_mode(self, mode: str) -> None:
        """'eager'; 'compile' (each batch bucket's regions compiled by pipeline/lm/compiled.py
        `compile_decode`); 'cudagraph' (one CUDA graph per (batch, key bucket) from `capture_graphs`, CUDA
        only); 'compile+cudagraph' (both: the compiled regions captured in those graphs). Drops graphs and
        compiled regions."""
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode {mode!r}: expected one of {DECODE_MODES}")
        if "cudagraph" in mode and self.device.type != "cuda":
            raise ValueError(f"decode mode {mode!r} needs a CUDA device, the model is on {self.device}")
        self.decode_mode = mode
        self._graphs.clear()
        self.step_regions.clear()

    def batch_buckets(self, max_batch: int) -> list[int]:
        """Batch buckets a step of up to `max_batch` calls (at most the pool's slots) runs in, smallest
        first."""
        return [b for b in BATCH_BUCKETS if b <= batch_bucket(min(max_batch, self.pool.capacity))]

    def attend_buckets(self) -> list[int]:
        """Key-length buckets of a decode step: 256, 512, ... doubling up to the slot size."""
        out, n = [], MIN_ATTEND_TOKENS
        while n < self.max_context_tokens:
            out.append(n)
            n *= 2
        return [*out, self.max_context_tokens]

    @torch.inference_mode()
    def capture_graphs(self, max_batch: int) -> int:
        """Capture every (batch bucket <= max_batch, key bucket) decode step now (warm-up, before serving),
        in one shared memory pool, largest first; returns the number of graphs. A failed capture with compiled
        regions retries with the eager ones; a failed eager capture turns graphs off for good (logged once;
        eager from then on), never a retry per step."""
        if "cudagraph" not in self.decode_mode or self._graphs_failed:
            return 0
        self._graphs.clear()
        rows_all = self.batch_buckets(max_batch)
        stage = self._stage
        stage[0].zero_(), stage[1].fill_(self.pool.scratch_slot), stage[2].zero_()  # warm-ups write scratch
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            self._capture_all(rows_all, side)
        except Exception:  # noqa: BLE001 - serving goes on with today's step
            self._graphs.clear()
            if self.step_regions:
                log.exception(
                    "CUDA graph capture of the compiled decode step failed: capturing the eager step"
                )
                self.step_regions.clear()
                self.decode_mode = "cudagraph"
                torch.cuda.current_stream(self.device).wait_stream(side)
                return self.capture_graphs(max_batch)
            log.exception("CUDA graph capture failed: decode steps run eager from now on")
            self._graphs_failed = True
            self.decode_mode = "eager"
        torch.cuda.current_stream(self.device).wait_stream(side)
        return len(self._graphs)

    def _capture_all(self, rows_all: list[int], side: torch.cuda.Stream) -> None:
        pool, stage = torch.cuda.graph_pool_handle(), self._stage
        with torch.cuda.stream(side):
            for rows in reversed(rows_all):
                for attend in reversed(self.attend_buckets()):
                    self._decode_forward(*stage[:, :rows], attend)  # kernels chosen, workspaces allocated
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                        out = self._decode_forward(*stage[:, :rows], attend)
                    self._graphs[(rows, attend)] = (graph, out)

    def _run_decode(self, rows: int, attend: int) -> Tensor:
        ids, slots, pos = self._stage[:, :rows]
        if "cudagraph" not in self.decode_mode:
            return self._decode_forward(ids, slots, pos, attend)
        entry = self._graphs.get((rows, attend))
        if entry is None:  # never captured while serving: a capture stalls every call
            if not self._graph_miss_logged:
                log.warning(
                    "no CUDA graph for %d rows x %d keys (capture_graphs not run?): eager", rows, attend
                )
                self._graph_miss_logged = True
            return self._decode_forward(ids, slots, pos, attend)
        graph, out = entry
        graph.replay()
        return out.clone()  # graphs share one memory pool: the next replay may reuse this buffer


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # decode rows are padded up to one of these


def batch_bucket(n: int) -> int:
    """Rows a decode step of `n` calls runs (padded to a power of two: one graph per bucket)."""
    for b in BATCH_BUCKETS:
        if b >= n:
            return b
    raise ValueError(f"{n} rows pass the largest decode batch {BATCH_BUCKETS[-1]}")

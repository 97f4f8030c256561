"""The LM decode step compiled gpt-fast style: inductor fuses each layer's small kernels.

A decode step reads ~19 GB of bf16 weights at batch 1, but as transformers' modules it also runs ~50 small
kernels per layer (RMSNorm's casts and reductions, RoPE's slices, negations and concatenations, the MLP's
activation, bias adds, residuals): with CUDA graphs the launches are gone, the kernels' own cost is not.
inductor fuses them (one kernel per norm, one for RoPE on q and k, one for the gated activation).

What is compiled: the two regions of a layer around its attention, `attention_inputs` (input norm, q/k/v
projections, RoPE) and `layer_output` (output projection, residual, post-attention norm, MLP, residual), from
pipeline/lm/model.py. Their shapes depend only on the batch bucket, not on the key bucket, and every layer has
the same structure, so dynamo makes one graph per (region, batch bucket) that all 40 layers reuse: 2 compiles
per batch bucket instead of one per (batch bucket, key bucket) for the whole step. Attention over the KV pool
(index writes, gathers, SDPA) stays as it is. The step with compiled regions is then captured in the same CUDA
graphs per (batch bucket, key bucket) as the eager step (pipeline/lm/model.py `capture_graphs`).

Compiled artefacts (inductor's FX graph cache, Triton kernels) are cached on disk under `cache_dir`
(TORCHINDUCTOR_CACHE_DIR, process-wide): a restart on a warm cache loads kernels instead of compiling them.

Fallback: each bucket is checked right after it compiles (compiled step's logits against the eager step's on
the same inputs); an exception or a failed check stops compiling (logged once) and that bucket and the rest
keep the eager regions; the budget stops it the same way (the compile in progress finishes first).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.lm.model import EAGER_REGIONS, Regions, attention_inputs, layer_output

if TYPE_CHECKING:
    from pipeline.lm.model import VoiceLM

log = logging.getLogger(__name__)

# Compiled vs eager logits of one step: ||compiled - eager|| / ||eager||
# (norms over every row and vocab entry).
# float32: inductor only reorders sums (measured 0 to 3e-7 on the tiny model), so the LM parity bound (1e-4)
# applies. bfloat16 carries 8 significant bits: the eager step rounds every intermediate to bf16 while fused
# kernels keep theirs in float32, so both sit some bf16 roundings per layer away from float32 and the residual
# stream carries them. Measured on the CPU at 40 layers (width 256, random weights): eager bf16 1.9 % from
# float32, compiled bf16 1.6 %, compiled vs eager 2.3-3.4 %. 2^-4 (6.25 %) leaves twice that and still fails
# a wrong kernel: a step without RoPE or without the post-attention norm differs by 9.5 % / 28 % already at 2
# layers (tests/unit/test_lm_compiled.py).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2**-4, torch.float16: 2**-4}


@dataclass(frozen=True)
class CompileReport:
    """What `compile_decode` did: which batch buckets run compiled, how long it took, the check."""

    buckets: tuple[int, ...]  # batch buckets whose compiled regions passed the check (the rest run eager)
    seconds: float  # the whole warm-up: compiling and checking every bucket
    bucket_seconds: dict[int, float] = field(default_factory=dict)  # per bucket, compile + check
    relative_diff: dict[int, float] = field(default_factory=dict)  # per checked bucket: see TOLERANCE
    tolerance: float = 0.0
    cache_dir: str = ""  # where inductor's artefacts are (TORCHINDUCTOR_CACHE_DIR)
    stopped: str = ""  # why compiling stopped before the last bucket ("" when it did not)

    def describe(self) -> str:
        done = ", ".join(
            f"{b} ({self.bucket_seconds[b]:.1f} s, diff {self.relative_diff[b]:.1e})" for b in self.buckets
        )
        stopped = f"; stopped: {self.stopped}" if self.stopped else ""
        return (
            f"compiled decode step for batch buckets [{done}] in {self.seconds:.1f} s (check: relative "
            f"logits diff <= {self.tolerance:.1e}; cache {self.cache_dir}){stopped}"
        )


def use_cache_dir(cache_dir: str) -> str:
    """Point inductor's on-disk caches at `cache_dir` ("" keeps torch's default); returns the directory."""
    if cache_dir:
        path = Path(cache_dir).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    return inductor_cache_dir()


def compiled_regions() -> Regions:
    """The two regions compiled with static shapes (dynamo keys each batch bucket's graph by its shapes)."""
    dynamo = torch._dynamo.config  # one graph per region and batch bucket (up to 9): past dynamo's default 8
    dynamo.recompile_limit = max(dynamo.recompile_limit, 32)
    return Regions(
        torch.compile(attention_inputs, fullgraph=True, dynamic=False),
        torch.compile(layer_output, fullgraph=True, dynamic=False),
    )


def compile_decode(lm: VoiceLM, max_batch: int, budget_s: float, cache_dir: str = "") -> CompileReport:
    """Compile and check the regions for each batch bucket of up to `max_batch` rows (smallest first: batch 1
    is the latency of a lone call) until one fails or `budget_s` is spent; the passing ones go into
    `lm.step_regions`. Warm-up only, before serving, with no cache held (the check writes KV into free slots).
    When no bucket compiles, the mode loses 'compile' (today's step: CUDA graphs of the eager regions)."""
    if not lm.decode_mode.startswith("compile"):
        raise RuntimeError(f"compile_decode in decode mode {lm.decode_mode!r}")
    if lm.pool.in_use:
        raise RuntimeError(f"compile_decode while {lm.pool.in_use} caches are held (its check writes KV)")
    report = compile_buckets(lm, lm.batch_buckets(max_batch), budget_s, cache_dir)
    if not lm.step_regions:
        lm.decode_mode = lm.decode_mode.replace("compile+", "").replace("compile", "eager")
    return report


def compile_buckets(lm: VoiceLM, rows_all: list[int], budget_s: float, cache_dir: str) -> CompileReport:
    t0 = time.monotonic()
    try:
        directory = use_cache_dir(cache_dir)
    except OSError as exc:  # a cache that cannot be made: serving goes on with the eager step
        log.exception("compile cache directory %r: the decode step runs eager", cache_dir)
        return CompileReport((), 0.0, stopped=f"cache directory {cache_dir!r}: {exc}")
    tolerance = TOLERANCE.get(lm.dtype, TOLERANCE[torch.bfloat16])
    report = {"buckets": [], "bucket_seconds": {}, "relative_diff": {}, "stopped": ""}
    if lm.quantization:
        report["stopped"] = f"{lm.quantization} layers (bitsandbytes) are not compiled"
        rows_all = []
    regions = compiled_regions() if rows_all else EAGER_REGIONS
    for rows in rows_all:
        if time.monotonic() - t0 >= budget_s:
            report["stopped"] = f"the {budget_s:.0f} s compile budget was spent before batch bucket {rows}"
            break
        t1 = time.monotonic()
        try:
            diff = check_bucket(lm, rows, regions)
        except Exception as exc:  # noqa: BLE001 - this bucket and the rest run eager
            log.exception(
                "compiling the decode step for batch bucket %d failed: it and the rest run eager", rows
            )
            report["stopped"] = f"batch bucket {rows}: {type(exc).__name__}: {exc}"[:500]
            break
        report["bucket_seconds"][rows] = round(time.monotonic() - t1, 2)
        report["relative_diff"][rows] = diff
        if diff > tolerance:
            log.warning(
                "compiled decode step at batch bucket %d: logits differ from eager by %.2e of their scale "
                "(> %.1e): it and the rest run eager",
                rows,
                diff,
                tolerance,
            )
            report["stopped"] = f"batch bucket {rows}: check failed ({diff:.2e} > {tolerance:.1e})"
            break
        lm.step_regions[rows] = regions
        report["buckets"].append(rows)
        log.info("compiled decode step, batch bucket %d: %.1f s", rows, report["bucket_seconds"][rows])
    out = CompileReport(
        buckets=tuple(report["buckets"]),
        seconds=round(time.monotonic() - t0, 2),
        bucket_seconds=report["bucket_seconds"],
        relative_diff=report["relative_diff"],
        tolerance=tolerance,
        cache_dir=directory,
        stopped=report["stopped"],
    )
    log.info("%s", out.describe())
    return out


@torch.inference_mode()
def check_bucket(lm: VoiceLM, rows: int, regions: Regions) -> float:
    """One decode step of `rows` rows with compiled and with eager regions, same inputs: their logits'
    difference relative to the eager logits (see TOLERANCE). Real rows sit in free slots (random keys and
    values
    before them) at random positions with random ids, the rest are padding rows on the scratch slot, as in
    serving. The regions compile on their first call, here."""
    real = min(rows, lm.pool.capacity)
    g = torch.Generator().manual_seed(rows)
    attend = lm.attend_buckets()[0]
    ids = torch.zeros(rows, dtype=torch.long)
    slots = torch.full((rows,), lm.pool.scratch_slot, dtype=torch.long)
    pos = torch.zeros(rows, dtype=torch.long)
    ids[:real] = torch.randint(0, lm.config.vocab_size, (real,), generator=g)
    slots[:real] = torch.arange(real)
    pos[:real] = torch.randint(0, attend, (real,), generator=g)
    ids, slots, pos = (t.to(lm.device) for t in (ids, slots, pos))
    for buf in (*lm.pool.k, *lm.pool.v):  # earlier keys and values, so RoPE and the scores matter
        history = torch.randn(buf[:real, :, :attend].shape, generator=g)
        buf[:real, :, :attend] = history.to(device=buf.device, dtype=buf.dtype)
    compiled = lm._decode_forward(ids, slots, pos, attend, regions)[:real]
    eager = lm._decode_forward(ids, slots, pos, attend, EAGER_REGIONS)[:real]
    return float(
        torch.linalg.vector_norm(compiled - eager) / torch.linalg.vector_norm(eager).clamp_min(1e-12)
    )

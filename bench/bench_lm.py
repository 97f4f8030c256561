"""LM cost at the real width (hidden 4096, ffn 13696, 32 heads, 2 KV groups, head 128, vocab 168960).

CPU (default): 2 and 4 layers, float32 and bfloat16, random weights, 2 threads: prefill 100/500 tokens,
decode ms/token, per-layer cost, 40-layer extrapolation, ratio to the official figures of docs/baseline.md.
    .venv/bin/python bench/bench_lm.py [--dtypes float32,bfloat16] [--runs 3]
GPU: the whole model (random bf16 weights made on the device, no checkpoint written):
    python bench/bench_lm.py --device cuda --dtype bfloat16 --layers 40
decode ms/token at batch 1 for eager / torch.compile / CUDA graphs next to the memory floor (achieved GB/s),
time for 23 tokens (first audio: 13 text + 10 speech), batch 4/8/16 step time, int4 memory and ms/token.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from pipeline.lm.model import VoiceLM
from pipeline.lm.sampling import sample_logits
from pipeline.weights.random_lm import FULL_SIZE, random_voice_lm

REAL = FULL_SIZE  # glm-4-voice-9b's sizes

# Official ChatGLM remote code, same machine kind, same sizes: docs/baseline.md, "LM" table (seconds).
# (layers, dtype) -> (prefill 100, prefill 500, decode step @100, decode step @500)
OFFICIAL_CPU_S = {
    (2, "float32"): (0.500, 1.651, 0.156, 0.154),
    (4, "float32"): (0.848, 3.221, 0.211, 0.226),
    (8, "float32"): (1.519, 6.311, 0.334, 0.349),
    (2, "bfloat16"): (0.674, 2.723, 0.148, 0.169),
    (4, "bfloat16"): (1.307, 5.623, 0.195, 0.203),
    (8, "bfloat16"): (2.550, 10.749, 0.306, 0.341),
}
OFFICIAL_40_BF16_CPU_DECODE_S = 1.148  # docs/baseline.md: whole 40-layer model, bf16, per token
OFFICIAL_GPU_DECODE_MS = 1000 / 22.76  # A800 bf16, HF generate (docs/baseline.md)
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "A800": 2039.0}  # HBM spec sheet bandwidth


def make_lm(layers: int, device: str, dtype: torch.dtype, int4: bool = False) -> VoiceLM:
    """The real-width LM with `layers` layers, random weights built on the device
    (pipeline/weights/random_lm.py)."""
    return random_voice_lm(dataclasses.replace(REAL, num_layers=layers), device, dtype, int4=int4)


def sync(lm: VoiceLM) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def timed(lm: VoiceLM, fn: Callable[[], object], runs: int) -> float:
    """Median seconds of `runs` calls after one warm-up."""
    fn()
    times = []
    for _ in range(runs):
        sync(lm)
        t0 = time.perf_counter()
        fn()
        sync(lm)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired(a: Callable[[], object], b: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median seconds of a and b, alternated run by run so that load on a shared machine hits both alike."""
    a(), b()
    ta, tb = [], []
    for _ in range(runs):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def against_transformers(
    lm: VoiceLM, prompt: int, runs: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(ours, transformers' own GlmForCausalLM forward with its DynamicCache) for prefill and one decode step,
    same weights, same process: a control that survives a loaded machine."""
    from transformers import DynamicCache

    ids = torch.randint(0, 150000, (prompt,)).tolist()

    def ours_prefill() -> None:
        cache = lm.new_cache()
        lm.prefill(cache, ids)
        cache.release()

    @torch.inference_mode()
    def hf_prefill() -> None:
        lm.model(
            input_ids=torch.tensor([ids]), past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1
        )

    prefill = paired(ours_prefill, hf_prefill, runs)
    cache, hf_cache = lm.new_cache(), DynamicCache()
    lm.prefill(cache, ids)
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([ids]), past_key_values=hf_cache, use_cache=True, logits_to_keep=1)

    def ours_step() -> None:
        lm.decode_step([cache], [1])
        cache.truncate(prompt)

    @torch.inference_mode()
    def hf_step() -> None:
        lm.model(input_ids=torch.tensor([[1]]), past_key_values=hf_cache, use_cache=True)
        hf_cache.crop(-1)

    decode = paired(ours_step, hf_step, runs * 3)
    cache.release()
    return prefill, decode


def prefill_s(lm: VoiceLM, n: int, runs: int) -> float:
    ids = torch.randint(0, 150000, (n,)).tolist()

    def run() -> None:
        cache = lm.new_cache()
        lm.prefill(cache, ids)
        cache.release()

    return timed(lm, run, runs)


def turn_prefill_s(lm: VoiceLM, cached: int, new: int, runs: int) -> float:
    """A later turn: `new` tokens prefilled on top of `cached` kept ones (the official server re-prefills
    all)."""
    cache = lm.new_cache()
    lm.prefill(cache, torch.randint(0, 150000, (cached,)).tolist())
    ids = torch.randint(0, 150000, (new,)).tolist()

    def run() -> None:
        lm.prefill(cache, ids)
        cache.truncate(cached)

    try:
        return timed(lm, run, runs)
    finally:
        cache.release()


def decode_s(lm: VoiceLM, context: int, steps: int, batch: int = 1) -> float:
    """Median seconds of one decode step with `batch` calls at ~`context` tokens (lengths differ by 1)."""
    caches = [lm.new_cache() for _ in range(batch)]
    for b, c in enumerate(caches):
        lm.prefill(c, torch.randint(0, 150000, (context + b,)).tolist())
    tokens = [1] * batch
    try:
        return timed(lm, lambda: lm.decode_step(caches, tokens), steps)
    finally:
        for c in caches:
            c.release()


def cpu_bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    flags = open("/proc/cpuinfo").read()
    cpu_bf16 = (
        "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16 units"
    )
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.machine(),
    )
    print(
        f"machine: {cpu} ({cpu_bf16}; docs/baseline.md's machine had no AMX), {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; load average at start {load:.1f} (a loaded shared machine inflates every time)"
    )
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        lm = make_lm(max(args.cpu_layers), "cpu", dtype)
        rows = {}
        for layers in sorted(args.cpu_layers, reverse=True):
            if layers < lm.config.num_layers:  # drop the top layers in place: embedding and head are reused
                del lm.model.model.layers[layers:]
                lm = VoiceLM(
                    lm.model, dataclasses.replace(lm.config, num_layers=layers), None, lm.device, dtype, None
                )
            ours = (
                prefill_s(lm, 100, args.runs),
                prefill_s(lm, 500, args.runs),
                decode_s(lm, 100, args.steps),
                decode_s(lm, 500, args.steps),
            )
            rows[layers] = ours
            official = OFFICIAL_CPU_S.get((layers, dtype_name))
            cells = []
            for name, o, ref in zip(
                ("prefill100", "prefill500", "decode@100", "decode@500"),
                ours,
                official or (None,) * 4,
                strict=True,
            ):
                ratio = f" (official {ref:.3f} s, {ref / o:.2f}x)" if ref else ""
                cells.append(f"{name} {o:.3f} s{ratio}")
            print(f"{dtype_name} {layers} layers: " + "; ".join(cells))
            turn = turn_prefill_s(lm, 400, 100, args.runs)
            print(
                f"{dtype_name} {layers} layers: turn 2 = 100 new tokens on 400 cached: {turn:.3f} s (the "
                "official "
                f"server re-prefills all 500: {ours[1]:.3f} s here, "
                f"{official[1] if official else float('nan'):.3f} s "
                f"official; {ours[1] / turn:.1f}x / "
                f"{(official[1] if official else float('nan')) / turn:.1f}x)"
            )
            (p_ours, p_hf), (d_ours, d_hf) = against_transformers(lm, 100, args.runs)
            print(
                f"{dtype_name} {layers} layers, same process, alternated: prefill100 ours {p_ours:.3f} s vs "
                f"transformers {p_hf:.3f} s ({p_hf / p_ours:.2f}x); decode@100 ours {d_ours:.3f} s vs "
                f"transformers {d_hf:.3f} s ({d_hf / d_ours:.2f}x)"
            )
        lo, hi = min(rows), max(rows)
        if lo != hi:
            per_layer = [(rows[hi][i] - rows[lo][i]) / (hi - lo) for i in range(4)]
            head = [rows[lo][i] - lo * per_layer[i] for i in range(4)]
            est = [head[i] + 40 * per_layer[i] for i in range(4)]
            print(
                f"{dtype_name} per layer: prefill100 {per_layer[0] * 1e3:.1f} ms, prefill500 "
                f"{per_layer[1] * 1e3:.1f} ms, "
                f"decode {per_layer[2] * 1e3:.1f} / {per_layer[3] * 1e3:.1f} ms; embedding+head decode "
                f"{head[2] * 1e3:.0f} ms"
            )
            extra = ""
            if dtype_name == "bfloat16":
                official_s = OFFICIAL_40_BF16_CPU_DECODE_S
                extra = f" (official measured 40 layers: {official_s:.3f} s, {official_s / est[2]:.2f}x)"
            print(
                f"{dtype_name} 40-layer extrapolation: prefill100 {est[0]:.2f} s, prefill500 {est[1]:.2f} s, "
                f"decode {est[2]:.3f} s/token{extra}"
            )
        del lm
        gc.collect()


def weight_bytes(lm: VoiceLM) -> int:
    """Bytes a decode step reads: every parameter except the embedding table (one row per token)."""
    total = 0
    for name, p in lm.model.named_parameters():
        if "embed_tokens" not in name:
            total += p.numel() * p.element_size()
    return total


def gpu_bench(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBS.items() if k in name), None)
    print(f"device: {name}; torch {torch.__version__}; {args.layers} layers, {args.dtype}, random weights")
    gpu_bf16(make_lm(args.layers, args.device, dtype), peak, args)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    q = make_lm(args.layers, args.device, dtype, int4=True)
    print(
        f"int4 (NF4, double quant): GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak, "
        f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB held; decode batch 1 [eager] "
        f"{decode_s(q, 100, args.steps) * 1e3:.2f} ms/token"
    )


def use_mode(lm: VoiceLM, mode: str, max_batch: int = 16) -> None:
    """`mode` prepared as the engine's warm-up does: compiled regions, then graphs
    (pipeline/engine/models.py)."""
    from pipeline.lm.compiled import compile_decode

    lm.set_decode_mode(mode)
    if mode.startswith("compile"):
        print(compile_decode(lm, max_batch, budget_s=600).describe())
    if "cudagraph" in mode:
        lm.capture_graphs(max_batch)
    if lm.decode_mode != mode:
        raise RuntimeError(f"fell back to {lm.decode_mode} (see the log)")


def gpu_bf16(lm: VoiceLM, peak: float | None, args: argparse.Namespace) -> None:
    lm.reserve_caches(16)  # batch 16 below
    gb = weight_bytes(lm) / 1e9
    floor = f", memory floor {gb / peak * 1e3:.2f} ms at {peak:.0f} GB/s" if peak else ""
    print(
        f"weights read per token: {gb:.2f} GB{floor}; GPU memory {torch.cuda.memory_allocated() / 2**30:.1f} "
        "GiB"
    )
    print(
        f"prefill 100 tokens: {prefill_s(lm, 100, args.runs) * 1e3:.1f} ms; 500: "
        f"{prefill_s(lm, 500, args.runs) * 1e3:.1f} ms"
    )
    best_mode, best = "eager", float("inf")
    for mode in ("eager", "compile", "cudagraph", "compile+cudagraph"):
        try:
            use_mode(lm, mode)
            s = decode_s(lm, 100, args.steps)
        except Exception as err:  # report and go on: one failing backend must not hide the others
            print(f"decode batch 1 [{mode}]: failed: {type(err).__name__}: {err}")
            continue
        print(
            f"decode batch 1 [{mode}]: {s * 1e3:.2f} ms/token, {1 / s:.1f} tokens/s, {gb / s:.0f} GB/s "
            "achieved"
            f" (official HF generate on an A800: {OFFICIAL_GPU_DECODE_MS:.1f} ms, "
            f"{OFFICIAL_GPU_DECODE_MS / (s * 1e3):.1f}x)"
        )
        if s < best:
            best_mode, best = mode, s
    use_mode(lm, best_mode)
    for batch in (4, 8, 16):
        s = decode_s(lm, 100, args.steps, batch)
        print(
            f"decode step batch {batch} [{best_mode}]: {s * 1e3:.2f} ms ({batch / s:.0f} tokens/s in total)"
        )
    prompt = torch.randint(0, 150000, (100,)).tolist()

    def first_audio() -> None:
        cache = lm.new_cache()
        logits = lm.prefill(cache, prompt)[None]
        for _ in range(23):  # the reply's first 13 text tokens, then the decoder's first 10-token block
            token = int(sample_logits(logits, 0.2, 0.8, 50)[0])
            logits = lm.decode_step([cache], [token])
        cache.release()

    print(f"prefill 100 + 23 sampled tokens [{best_mode}]: {timed(lm, first_audio, args.runs) * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", help="GPU dtype")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="CPU dtypes")
    parser.add_argument("--layers", type=int, default=40, help="GPU layer count")
    parser.add_argument("--cpu-layers", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        gpu_bench(args)
    else:
        cpu_bench(args)


if __name__ == "__main__":
    main()

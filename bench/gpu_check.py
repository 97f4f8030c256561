"""The one-shot GPU check: parity on the device, full-size LM / tokenizer / decoder figures, the engine
end to end.

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "$OUT"       # on the GPU machine: no venv, no network
    .venv/bin/python bench/gpu_check.py --tiny --out /tmp/gpu_check  # every section on the CPU, tiny models

Sections run one after another, each time-boxed and independent (a failure is written with its traceback and
the next section runs); `gpu_check.json` and `gpu_check.md` are rewritten after every section, so a run cut
short still reports what it measured. `--budget-s` shrinks the sections (batch 16, the 2000-token prefill and
16 concurrent calls go first). Only torch, transformers, safetensors, tiktoken, regex, pyyaml and numpy are
needed: nothing from server/ (no aiortc, av, onnxruntime, soxr). docs/gpu.md says how to run it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import gc
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.lm.convert import LMConfig  # noqa: E402
from pipeline.lm.model import VoiceLM  # noqa: E402
from pipeline.weights.random_lm import FULL_SIZE, random_voice_lm  # noqa: E402

TINY_LM = dataclasses.replace(
    FULL_SIZE,
    num_layers=2,
    hidden_size=128,
    ffn_hidden_size=256,
    num_heads=4,
    kv_groups=2,
    head_dim=32,
    vocab_size=1024,
)
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # HBM spec sheet bandwidth, GB/s
PARITY_TOL = 1e-4  # float32, as tests/parity
# Share of the budget per section (full run, H100: model set-up included).
SHARES = {"parity": 0.06, "lm": 0.39, "int4": 0.02, "stages": 0.17, "engine": 0.30, "transcription": 0.06}


class SectionTimeout(Exception):
    pass


class Check:
    """Run state: device, clock, report (JSON + markdown rewritten after every section)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.tiny = args, args.tiny
        self.device = torch.device("cpu" if args.tiny else args.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)  # torch.cuda.set_device needs an index
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.report: dict = {"machine": machine(self.device), "args": vars(args), "sections": {}}
        self.section_deadline = self.deadline

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def left_s(self) -> float:
        """Seconds left to the current section (soft: a section skips its optional parts below a
        threshold)."""
        return self.section_deadline - time.monotonic()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mem_gb(self) -> float | None:
        return torch.cuda.memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else None

    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self, name: str, fn: Callable[[Check, dict], None]) -> None:
        share = SHARES[name] * self.args.budget_s
        now = time.monotonic()
        self.section_deadline = min(now + share, self.deadline)
        hard_s = max(5, int(min(2 * share, self.deadline + 60 - now)))
        figures: dict = {}
        entry = {"status": "running", "figures": figures}
        self.report["sections"][name] = entry
        self.log(f"section {name}: start (soft {share:.0f} s, hard {hard_s} s)")

        def on_alarm(signum, frame):  # noqa: ANN001
            raise SectionTimeout(f"section {name} passed its hard limit of {hard_s} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(hard_s)
        try:
            fn(self, figures)
            entry["status"] = figures.pop("_status", "ok")
        except BaseException as exc:  # noqa: BLE001 - reported, the next section runs
            if isinstance(exc, KeyboardInterrupt):
                raise
            entry["status"] = "failed"
            entry["error"] = traceback.format_exc()
            self.log(f"section {name}: FAILED\n{entry['error']}")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            entry["seconds"] = round(time.monotonic() - now, 1)
            self.free_memory()
        self.log(f"section {name}: {entry['status']} in {entry['seconds']} s")
        self.write()

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "gpu_check.json").write_text(
            json.dumps(self.report, indent=2, default=str), encoding="utf-8"
        )
        (self.out / "gpu_check.md").write_text(markdown(self.report), encoding="utf-8")


def machine(device: torch.device) -> dict:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10
            ).stdout.strip()
            or "?"
        )
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "commit": commit,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(
            gpu=props.name,
            gpu_memory_gb=round(total / 1e9, 1),
            gpu_free_gb=round(free / 1e9, 1),
            sms=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return info


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# GPU check ({'tiny, CPU' if report['args'].get('tiny') else m.get('gpu', m['device'])})",
        "",
        "machine: " + ", ".join(f"{k} {v}" for k, v in m.items()),
        f"elapsed: {report.get('elapsed_s')} s",
        "",
    ]
    for name, entry in report["sections"].items():
        lines += [f"## {name}: {entry['status']} ({entry.get('seconds', '?')} s)", ""]
        for key, value in entry["figures"].items():
            lines.append(f"- {key}: {json.dumps(value, default=str)}")
        if entry.get("error"):
            lines += ["", "```", entry["error"].rstrip(), "```"]
        lines.append("")
    return "\n".join(lines)


def timed_ms(check: Check, fn: Callable[[], object], runs: int) -> float:
    """Median milliseconds of `runs` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        check.sync()
        t0 = time.perf_counter()
        fn()
        check.sync()
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 3)


def parity_path(stage: str) -> Path:
    return Path(os.environ.get("GLM4VOICE_PARITY_DIR") or ROOT / "tests" / "fixtures" / "parity") / stage


# ----- (a) parity on the device -----------------------------------------------------------------------------


def section_parity(check: Check, fig: dict) -> None:
    dev = check.device
    # fp32 parity: no TF32 in cuDNN convolutions (on by default) or matmuls.
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
    failures: list[str] = []

    def expect(name: str, ok: bool) -> None:
        if not ok:
            failures.append(name)

    lm_dir = parity_path("lm")
    lm = VoiceLM.from_pretrained(lm_dir, device=dev, dtype=torch.float32)
    for case in json.loads((lm_dir / "cases.json").read_text())["cases"]:
        ref = np.load(lm_dir / f"{case['name']}_logits.npy")
        diff = float(np.abs(lm.logits(case["input_ids"]).cpu().numpy() - ref).max())
        expected = case["greedy_new_tokens"]
        greedy = lm.generate(case["input_ids"], max_new_tokens=len(expected), temperature=0.0)
        step_ref = np.load(lm_dir / f"{case['name']}_greedy_step_logits.npy")
        cache = lm.new_cache()
        steps = [lm.prefill(cache, case["input_ids"])] + [
            lm.decode_step([cache], [t])[0] for t in expected[:-1]
        ]
        step_diff = float(np.abs(torch.stack(steps).cpu().numpy() - step_ref).max())
        cache.release()
        fig[f"lm_{case['name']}"] = {
            "logits_max_abs": diff,
            "greedy_equal": greedy == expected,
            "cached_step_logits_max_abs": step_diff,
        }
        expect(f"lm {case['name']} logits", diff <= PARITY_TOL and step_diff <= PARITY_TOL)
        expect(f"lm {case['name']} greedy", greedy == expected)
    if dev.type == "cuda":
        fig["lm_cudagraph_vs_eager_max_abs"] = graph_vs_eager(lm)
        expect("cudagraph == eager", fig["lm_cudagraph_vs_eager_max_abs"] <= PARITY_TOL)
    else:
        fig["lm_cudagraph_vs_eager_max_abs"] = "not run: CUDA graphs need a CUDA device"
    del lm
    check.log("parity: LM done")

    from pipeline.tokenizer.tokenizer import SpeechTokenizer

    tok_dir = parity_path("speech_tokenizer")
    tok = SpeechTokenizer.from_pretrained(tok_dir, device=dev)
    cases = json.loads((tok_dir / "cases.json").read_text())["individual_calls"]
    for case in (
        cases[:1] if check.tiny else cases
    ):  # --tiny: the script is proven, not the fixtures (CPU time)
        wav = np.load(tok_dir / case["wav"]).astype(np.float32) / 32768.0
        equal = tok.tokenize(wav) == case["tokens"]
        fig[f"tokenizer_{case['name']}_tokens_equal"] = equal
        expect(f"tokenizer {case['name']}", equal)
    del tok
    check.log("parity: speech tokenizer done")

    from pipeline.decoder.draws import QueuedDraws
    from pipeline.decoder.model import SpeechDecoder
    from pipeline.decoder.stream import DecoderStream

    dec_dir = parity_path("decoder")
    offline = dec_dir / "case_offline"
    draws = {"z": "noise_z", "phase": "noise_phase", "sine_randn": "noise_sine_randn"}
    decoder = SpeechDecoder.from_pretrained(dec_dir, device=dev)
    injected = QueuedDraws([{k: np.load(offline / f"{v}.npy") for k, v in draws.items()}], device=dev)
    stream = DecoderStream(decoder, draws=injected, cache_encoder=False)
    case = json.loads((offline / "case.json").read_text())
    out = stream.decode_block(case["tokens"], finalize=True)
    mel = float(
        np.abs(out.mel.float().cpu().numpy().reshape(-1) - np.load(offline / "mel.npy").reshape(-1)).max()
    )
    audio = float(
        np.abs(np.asarray(out.audio).reshape(-1) - np.load(offline / "speech.npy").reshape(-1)).max()
    )
    fig["decoder_offline"] = {"mel_max_abs": mel, "audio_max_abs": audio}
    expect("decoder offline", mel <= PARITY_TOL and audio <= PARITY_TOL)
    torch.backends.cudnn.allow_tf32 = True
    if failures:
        raise AssertionError(f"parity failed: {', '.join(failures)} (figures above)")


def graph_vs_eager(lm: VoiceLM) -> float:
    """Max |logits| difference of greedy decode steps, CUDA graph replay vs eager, same cache contents."""
    prompt = list(range(1, 30))
    worst = 0.0
    for batch in (1, 3):
        caches = [lm.new_cache() for _ in range(batch)]
        for i, c in enumerate(caches):
            lm.prefill(c, prompt[: 10 + 5 * i])
        tokens = [1] * batch
        outs = {}
        for mode in ("eager", "cudagraph"):
            lm.set_decode_mode(mode)
            if mode == "cudagraph":
                lm.capture_graphs(max_batch=4)
            outs[mode] = lm.decode_step(caches, tokens).clone()
            for c in caches:
                c.truncate(c.length - 1)
        worst = max(worst, float((outs["eager"] - outs["cudagraph"]).abs().max()))
        for c in caches:
            c.release()
    lm.set_decode_mode("eager")
    return worst


# ----- (b) the full-size LM ---------------------------------------------------------------------------------


def weight_bytes_per_step(lm: VoiceLM, batch: int) -> int:
    """Bytes a decode step must read: every weight once, but only `batch` rows of the embedding table."""
    total = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    embed = lm.model.model.embed_tokens.weight
    return total - embed.numel() * embed.element_size() + batch * embed.shape[1] * embed.element_size()


def kv_bytes_read(lm: VoiceLM, batch: int, context: int) -> int:
    c = lm.config
    return (
        2
        * c.num_layers
        * batch
        * c.kv_groups
        * context
        * c.head_dim
        * torch.tensor([], dtype=lm.dtype).element_size()
    )


def section_lm(check: Check, fig: dict) -> None:
    dev, tiny = check.device, check.tiny
    cfg: LMConfig = TINY_LM if tiny else FULL_SIZE
    dtype = torch.float32 if tiny else torch.bfloat16
    slots = 4 if tiny else 32
    t0 = time.monotonic()
    lm = random_voice_lm(cfg, dev, dtype)
    check.sync()
    fig["build_s"] = round(time.monotonic() - t0, 1)
    fig["params_b"] = round(sum(p.numel() for p in lm.model.parameters()) / 1e9, 3)
    fig["memory_after_load_gb"] = check.mem_gb()
    lm.reserve_caches(slots)
    fig["kv_slots"] = slots
    fig["memory_after_kv_reserve_gb"] = check.mem_gb()
    check.log(
        f"lm: built {fig['params_b']} B params in {fig['build_s']} s, memory "
        f"{fig['memory_after_kv_reserve_gb']}"
    )

    prefill = {}
    for n in (100, 500, 2000):
        if n == 2000 and check.left_s() < 0.6 * SHARES["lm"] * check.args.budget_s:
            prefill[n] = "skipped: budget"
            continue
        ids = torch.randint(0, cfg.vocab_size, (n,)).tolist()

        def run(ids: list[int] = ids) -> None:
            cache = lm.new_cache()
            lm.prefill(cache, ids)
            cache.release()

        prefill[n] = timed_ms(check, run, 1 if tiny else 3)
    fig["prefill_ms"] = prefill
    check.log(f"lm: prefill ms {prefill}")

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    peak = next((v for k, v in PEAK_GBS.items() if k in name), None)
    context = 1000  # tokens already in each call's cache: a few turns in
    lm.reserve_caches(slots, 2 * context)  # key buckets 256..2048: fewer graphs to capture
    batches = (1, 4) if tiny else (1, 4, 16, 32)
    compile_batch = 1 if tiny else slots  # --tiny: one bucket (a cold inductor compile is slow on a CPU)
    modes = ("eager", "cudagraph", "compile+cudagraph") if dev.type == "cuda" else ("eager", "compile")
    decode: dict = {b: {} for b in batches}
    for mode in modes:
        if not prepare_decode_mode(check, lm, mode, compile_batch, fig):
            continue
        for batch in batches:
            if batch >= 16 and check.left_s() < 0.15 * SHARES["lm"] * check.args.budget_s:
                decode[batch][mode] = "skipped: budget"
                continue
            decode[batch][mode] = time_decode(check, lm, batch, context, peak)
            check.log(f"lm: {mode} decode batch {batch} at {context} cached tokens: {decode[batch][mode]}")
    lm.set_decode_mode("eager")
    fig["decode"] = decode
    fig["decode_context_tokens"] = context
    fig["peak_gbs_spec"] = peak
    if "compile" in fig and check.left_s() > 20:
        fig["compile_warm_cache"] = compile_probe(check, compile_batch, 2 * context)
        check.log(f"lm: compile on a warm cache, new process: {fig['compile_warm_cache']}")


def prepare_decode_mode(check: Check, lm: VoiceLM, mode: str, max_batch: int, fig: dict) -> bool:
    """Set `mode` as the engine's warm-up does (compile within --compile-budget-s, capture); False when it
    fell
    back to another mode (reported)."""
    from pipeline.lm.compiled import compile_decode

    lm.set_decode_mode(mode)
    if mode.startswith("compile"):
        report = compile_decode(lm, max_batch, check.args.compile_budget_s)
        fig["compile"] = dataclasses.asdict(report)
        check.log(f"lm: {report.describe()}")
    if "cudagraph" in lm.decode_mode:
        t0 = time.monotonic()
        fig[f"graphs_{mode}"] = {"captured": lm.capture_graphs(max_batch=lm.pool.capacity)}
        fig[f"graphs_{mode}"]["capture_s"] = round(time.monotonic() - t0, 1)
        fig[f"graphs_{mode}"]["memory_gb"] = check.mem_gb()
        check.log(f"lm: {mode}: {fig[f'graphs_{mode}']}")
    if lm.decode_mode != mode:
        fig[f"mode_{mode}"] = f"fell back to {lm.decode_mode}"
        return False
    return True


def time_decode(check: Check, lm: VoiceLM, batch: int, context: int, peak: float | None) -> dict:
    caches = [lm.new_cache() for _ in range(batch)]
    for c in caches:
        c.token_ids.extend([0] * context)  # KV contents do not change the cost

    def step() -> None:
        lm.decode_step(caches, [1] * len(caches))
        for c in caches:
            c.truncate(context)

    ms = timed_ms(check, step, 3 if check.tiny else 10)
    for c in caches:
        c.release()
    floor_bytes = weight_bytes_per_step(lm, batch) + kv_bytes_read(lm, batch, context + 1)
    return {
        "ms_per_step": ms,
        "achieved_gbs": round(floor_bytes / ms / 1e6, 1),
        "floor_ms": round(floor_bytes / peak / 1e6, 3) if peak else None,
        "bandwidth_pct": round(100 * floor_bytes / ms / 1e6 / peak, 1) if peak else None,
    }


def compile_probe(check: Check, slots: int, context_tokens: int) -> dict:
    """The compile warm-up in a new process on the cache the first compile filled (what a restart pays)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--out",
        str(check.out / "probe"),
        "--compile-probe",
    ]
    cmd += ["--device", str(check.device), f"--slots={slots}", f"--context={context_tokens}"]
    cmd += ["--tiny"] if check.tiny else []
    cmd += [f"--compile-budget-s={check.args.compile_budget_s}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60.0, check.left_s()))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stdout + proc.stderr)[-1500:]}
    report = json.loads(lines[-1])
    return {
        "cache": report["cache"],
        "compile_s": report["seconds"],
        "buckets": report["buckets"],
        "process_s": round(time.monotonic() - t0, 1),
    }


def run_compile_probe(args: argparse.Namespace) -> int:
    from pipeline.lm.compiled import compile_decode

    device = torch.device("cpu" if args.tiny else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    lm = random_voice_lm(
        TINY_LM if args.tiny else FULL_SIZE, device, torch.float32 if args.tiny else torch.bfloat16
    )
    lm.reserve_caches(args.slots, args.context)
    lm.set_decode_mode("compile+cudagraph" if device.type == "cuda" else "compile")
    report = dataclasses.asdict(compile_decode(lm, args.slots, args.compile_budget_s))
    from torch._dynamo.utils import counters

    report["cache"] = {k: v for k, v in counters["inductor"].items() if "cache" in k}  # hits and misses
    print(json.dumps(report), flush=True)
    return 0


# ----- (c) int4 ---------------------------------------------------------------------------------------------


def section_int4(check: Check, fig: dict) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        fig["_status"] = "skipped"
        fig["reason"] = f"bitsandbytes does not import ({err}); carry its wheel to measure int4 (docs/gpu.md)"
        return
    if check.device.type != "cuda":
        fig["_status"] = "skipped"
        fig["reason"] = "int4 (bitsandbytes NF4) needs CUDA"
        return
    lm = random_voice_lm(FULL_SIZE, check.device, torch.bfloat16, int4=True)
    fig["memory_after_load_gb"] = check.mem_gb()
    cache = lm.new_cache()
    cache.token_ids.extend([0] * 1000)

    def step() -> None:
        lm.decode_step([cache], [1])
        cache.truncate(1000)

    fig["decode_ms_batch1"] = timed_ms(check, step, 10)


# ----- (d) full-size speech tokenizer and decoder -----------------------------------------------------------


def demo_root() -> Path:
    from pipeline.weights.demo import ensure_demo_weights

    return ensure_demo_weights(Path(tempfile.gettempdir()) / "glm4voice_gpu_check_demo")


def speech_tokenizer(check: Check, dtype: torch.dtype):
    from pipeline.tokenizer.tokenizer import SpeechTokenizer

    if check.tiny:
        return SpeechTokenizer.from_pretrained(
            demo_root() / "glm-4-voice-tokenizer", device=check.device, dtype=dtype
        )
    from bench_tokenizer import build

    return build(check.device, dtype)


def speech_decoder(check: Check, dtype: torch.dtype):
    from pipeline.decoder.model import SpeechDecoder
    from pipeline.weights.random_decoder import random_decoder

    if check.tiny:
        return SpeechDecoder.from_pretrained(
            demo_root() / "glm-4-voice-decoder", device=check.device, dtype=dtype
        )
    return random_decoder(seed=0, device=str(check.device), dtype=dtype)


def section_stages(check: Check, fig: dict) -> None:
    from pipeline.tokenizer.stream import TokenizerStream
    from pipeline.weights.random_tokenizer import calibration_audio

    wav = calibration_audio(5.0, 16000, np.random.default_rng(0))  # a 5 s turn
    fig["precision_parity_fixtures"] = stage_precision(check)
    check.log(f"stages: bf16 vs fp32 on the parity fixtures: {fig['precision_parity_fixtures']}")
    full_tokens, full_audio = {}, {}
    for dtype in (
        (torch.float32,) if check.tiny else (torch.float32, torch.bfloat16)
    ):  # bf16 convs crawl on CPUs
        name = str(dtype).removeprefix("torch.")
        if dtype == torch.bfloat16 and check.left_s() < 0.4 * SHARES["stages"] * check.args.budget_s:
            fig[f"{name}"] = "skipped: budget"
            continue
        tok = speech_tokenizer(check, dtype)
        full_tokens[dtype] = tok.tokenize(wav)
        pushes, flushes = [], []
        for _ in range(2 if check.tiny else 4):
            stream = TokenizerStream(tok)
            check.sync()
            t0 = time.perf_counter()
            for i in range(0, len(wav), 320):  # 20 ms pushes
                stream.push(wav[i : i + 320])
            check.sync()
            t1 = time.perf_counter()
            stream.flush()
            check.sync()
            pushes.append(t1 - t0)
            flushes.append(time.perf_counter() - t1)
        fig[f"tokenizer_{name}"] = {
            "flush_ms_5s_turn": round(1e3 * statistics.median(flushes[1:]), 2),
            "all_pushes_s_5s_turn": round(statistics.median(pushes[1:]), 3),
        }
        del tok, stream
        check.log(f"stages: tokenizer {name}: {fig[f'tokenizer_{name}']}")

        dec = speech_decoder(check, dtype)
        fig[f"decoder_{name}"] = decoder_graphs_vs_eager(check, dec)
        full_audio[dtype] = decoder_blocks(check, dec, 2)[1]  # seeded: the same draws in both dtypes
        del dec
        check.free_memory()
        check.log(f"stages: decoder {name}: {fig[f'decoder_{name}']}")
    if len(full_tokens) == 2:  # the full-size random stages, bf16 against fp32 (5 s turn; 2 decoder blocks)
        fig["precision_full_size"] = {
            "tokenizer_bf16_vs_fp32_agreement_pct": token_agreement(*full_tokens.values()),
            "decoder_audio_bf16_vs_fp32_rel_rms": rel_rms(*reversed(full_audio.values())),
        }
        check.log(f"stages: full size, bf16 vs fp32: {fig['precision_full_size']}")


def rel_rms(x: np.ndarray, ref: np.ndarray) -> float:
    """||x - ref|| / ||ref||: error relative to the signal."""
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-12))


def token_agreement(a: list[int], b: list[int]) -> float:
    """Share of positions (over the longer list) where two token lists agree, in %."""
    same = sum(x == y for x, y in zip(a, b, strict=False))
    return round(100.0 * same / max(len(a), len(b), 1), 2)


def stage_precision(check: Check) -> dict:
    """bf16 against fp32 on the parity fixtures (their tiny random models): the speech tokenizer's tokens
    (agreement) and the decoder's offline mel and audio (error relative to the fp32 output, same draws)."""
    from pipeline.decoder.draws import QueuedDraws
    from pipeline.decoder.model import SpeechDecoder
    from pipeline.decoder.stream import DecoderStream
    from pipeline.tokenizer.tokenizer import SpeechTokenizer

    out: dict = {}
    tok_dir = parity_path("speech_tokenizer")
    cases = json.loads((tok_dir / "cases.json").read_text())["individual_calls"]
    wavs = [np.load(tok_dir / c["wav"]).astype(np.float32) / 32768.0 for c in cases]
    tokens = {}
    for dtype in (torch.float32, torch.bfloat16):
        tok = SpeechTokenizer.from_pretrained(tok_dir, device=check.device, dtype=dtype)
        tokens[dtype] = [tok.tokenize(w) for w in wavs]
    out["tokenizer_bf16_vs_fp32_agreement_pct"] = {
        c["name"]: token_agreement(a, b)
        for c, a, b in zip(cases, tokens[torch.float32], tokens[torch.bfloat16], strict=True)
    }
    out["tokenizer_fp32_equals_fixture"] = all(
        t == c["tokens"] for t, c in zip(tokens[torch.float32], cases, strict=True)
    )
    dec_dir = parity_path("decoder")
    offline = dec_dir / "case_offline"
    case = json.loads((offline / "case.json").read_text())
    names = {"z": "noise_z", "phase": "noise_phase", "sine_randn": "noise_sine_randn"}
    blocks = {}
    for dtype in (torch.float32, torch.bfloat16):
        decoder = SpeechDecoder.from_pretrained(dec_dir, device=check.device, dtype=dtype)
        draws = QueuedDraws(
            [{k: np.load(offline / f"{v}.npy") for k, v in names.items()}], device=check.device
        )
        blocks[dtype] = DecoderStream(decoder, draws=draws, cache_encoder=False).decode_block(
            case["tokens"], finalize=True
        )
    mel = {d: b.mel.float().cpu().numpy().reshape(-1) for d, b in blocks.items()}
    audio = {d: np.asarray(b.audio, dtype=np.float32).reshape(-1) for d, b in blocks.items()}
    out["decoder_bf16_vs_fp32"] = {
        "mel_rel_rms": rel_rms(mel[torch.bfloat16], mel[torch.float32]),
        "mel_max_abs": float(np.abs(mel[torch.bfloat16] - mel[torch.float32]).max()),
        "audio_rel_rms": rel_rms(audio[torch.bfloat16], audio[torch.float32]),
        "audio_max_abs": float(np.abs(audio[torch.bfloat16] - audio[torch.float32]).max()),
    }
    return out


def decoder_blocks(check: Check, dec, blocks: int) -> tuple[list[float], np.ndarray]:
    """Blocks 1..N of one reply (10 then 20 tokens: the engine's first blocks), each timed -> (ms, audio)."""
    from pipeline.decoder.stream import DecoderStream

    stream = DecoderStream(dec, schedule=(10, 20), seed=0)  # seeded once: every run draws the same numbers
    rng, block_ms, audio = np.random.default_rng(0), [], []
    for k in range(blocks):
        tokens = rng.integers(0, dec.num_tokens, 10 if k == 0 else 20).tolist()
        check.sync()
        t0 = time.perf_counter()
        audio.append(stream.decode_block(tokens, finalize=False).audio)
        check.sync()
        block_ms.append(round(1e3 * (time.perf_counter() - t0), 2))
    return block_ms, np.concatenate(audio)


def decoder_graphs_vs_eager(check: Check, dec) -> dict:
    """Decoder block ms eager, then with the CUDA graphs of pipeline/decoder/graphs.py (on the CPU: their
    static-buffer path, uncaptured), and the largest audio difference between the two (same draws)."""
    from pipeline.decoder.graphs import prepare_graphs

    blocks = 3 if check.tiny else 10
    dec.graphs = None
    decoder_blocks(check, dec, blocks)  # kernels warmed up
    eager_ms, eager_audio = decoder_blocks(check, dec, blocks)
    t0 = time.perf_counter()
    graphs = prepare_graphs(dec, schedule=(10, 20))  # the engine's warm-up capture (CUDA; CPU: buffers only)
    capture_s = time.perf_counter() - t0
    if graphs is None:
        return {"eager_block_ms": eager_ms, "graphs": "capture failed (see the log)"}
    graph_ms, graph_audio = decoder_blocks(check, dec, blocks)
    dec.graphs = None
    return {
        "eager_block_ms": eager_ms,
        "graph_block_ms": graph_ms,
        "graphs_captured": graphs.captured,
        "graphs": len(graphs),
        "capture_s": round(capture_s, 2),
        "graph_replays": graphs.replays,
        "eager_runs_with_graphs": graphs.eager_runs,
        "first_block_ms_10_tokens": {"eager": eager_ms[0], "graph": graph_ms[0]},
        f"block_{blocks}_ms_20_tokens": {"eager": eager_ms[-1], "graph": graph_ms[-1]},
        "speedup_blocks_2_on": round(sum(eager_ms[1:]) / sum(graph_ms[1:]), 2),
        "graph_vs_eager_audio_max_abs": float(np.abs(graph_audio - eager_audio).max()),
        "audio_ms_per_20_token_block": 1600,
    }


# ----- (e) the engine end to end ----------------------------------------------------------------------------


def install_chain(lm: VoiceLM, script: dict, seed: int = 0) -> None:
    """Make a random LM say the demo script (pipeline/weights/demo.py's bigram chain, on GLM names), so
    replies end, interleave 13 text / 26 speech tokens and stop, at full size and full cost."""
    from pipeline.weights.demo import CHAIN_LOGIT_MARGIN, OTHER_LOGIT_STD, RESIDUAL_BRANCH_SCALE

    model, h = lm.model, lm.config.hidden_size
    nodes = [script["predecessor_id"], *script["reply_ids"]]
    targets = [*script["reply_ids"], script["stop_id"]]
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(h, h, generator=g, dtype=torch.float64))
    chain = (basis[: len(nodes)] * h**0.5).to(device=lm.device, dtype=lm.dtype)  # (N, H), rms 1 per row
    with torch.no_grad():
        model.model.embed_tokens.weight[torch.tensor(nodes, device=lm.device)] = chain
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(RESIDUAL_BRANCH_SCALE)
            layer.mlp.down_proj.weight.mul_(RESIDUAL_BRANCH_SCALE)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.mul_(OTHER_LOGIT_STD)
        model.lm_head.weight[torch.tensor(targets, device=lm.device)] = chain * (CHAIN_LOGIT_MARGIN / h)


def full_size_models(check: Check):
    """The engine's `Models` at full size, random weights, built on the device (demo text tokenizer and
    script)."""
    from pipeline.engine.models import Models
    from pipeline.lm.text_tokenizer import GLMTokenizer
    from pipeline.weights.resolve import ResolvedWeights, decoder_dtype

    root = demo_root()
    script = json.loads((root / "demo_script.json").read_text())
    lm = random_voice_lm(FULL_SIZE, check.device, torch.bfloat16)
    install_chain(lm, script)
    text = GLMTokenizer.from_pretrained(root / "glm-4-voice-9b")
    weights = ResolvedWeights(  # the engine's default dtypes (pipeline/weights/resolve.py)
        kind="random-full-size",
        tokenizer_dir=root / "glm-4-voice-tokenizer",
        lm_dir=root / "glm-4-voice-9b",
        decoder_dir=root / "glm-4-voice-decoder",
        device=check.device,
        lm_dtype=torch.bfloat16,
        tokenizer_dtype=torch.float32,
        decoder_dtype=decoder_dtype(check.device),
        quantization="",
    )
    tokenizer = speech_tokenizer(check, weights.tokenizer_dtype)
    return Models(weights, tokenizer, lm, text, speech_decoder(check, weights.decoder_dtype))


class StackSampler(threading.Thread):
    """Samples every other thread's innermost frames every 20 ms; `stop()` -> the most frequent stacks
    (thread name, then file:line function of the 4 innermost frames) with their share of the samples."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop_event = threading.Event()
        self.start()

    def run(self) -> None:
        names = {}
        while not self._stop_event.wait(0.02):
            names = {t.ident: t.name for t in threading.enumerate()}
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == self.ident:
                    continue
                stack = []
                while frame is not None and len(stack) < 4:
                    code = frame.f_code
                    stack.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
                    frame = frame.f_back
                self.counts[f"{names.get(ident, ident)}: " + " < ".join(stack)] += 1

    def stop(self) -> list[str]:
        self._stop_event.set()
        self.join()
        return [f"{100 * c / max(1, self.samples):.0f}% {s}" for s, c in self.counts.most_common(14)]


async def one_turn(session, text: str) -> dict:
    from pipeline.responder import AudioChunk, ReplyDone, ReplyError, Timing

    session.add_text(text)
    t_commit = time.monotonic()
    turn = session.respond()
    audio_s, first_t, worst_lag_s, end, marks = 0.0, None, 0.0, None, {}
    async for event in turn.events():
        now = time.monotonic()
        if isinstance(event, AudioChunk):
            if first_t is None:
                first_t = now
            # Playback starts with the first chunk; a chunk arriving after the audio before it ran out is a
            # gap.
            worst_lag_s = max(worst_lag_s, (now - first_t) - audio_s)
            audio_s += event.pcm.size / event.sample_rate_hz
        elif isinstance(event, Timing):
            marks[event.stage] = event.t_monotonic_s
        elif isinstance(event, ReplyDone | ReplyError):
            end = event
    if not isinstance(end, ReplyDone):
        raise RuntimeError(f"turn ended with {end}")
    return {
        "first_pcm_ms": 1e3 * (first_t - t_commit) if first_t else None,
        "audio_s": audio_s,
        "worst_gap_ms": 1e3 * worst_lag_s,
        "reason": end.reason,
        "budget_ms": first_audio_budget(t_commit, marks, first_t),
    }


TEXT_TOKENS_FIRST = 13  # a reply starts with 13 text tokens, then speech (docs/lm.md: the 13/26 interleave)


def first_audio_budget(t_commit: float, marks: dict[str, float], first_t: float | None) -> dict:
    """Commit -> first PCM split by the engine's Timing events: prefill, the 13 text steps, the first block's
    speech steps, the first decoder block, the send. The engine marks no "first block ready": the speech steps
    are estimated at the text steps' pace (9 more steps after the first speech token) and the block is the
    rest.
    """
    need = ("prefill_done", "first_text_token", "first_speech_token", "first_pcm")
    if first_t is None or any(k not in marks for k in need):
        return {"missing_timing_events": [k for k in need if k not in marks]}
    step_s = (marks["first_speech_token"] - marks["first_text_token"]) / TEXT_TOKENS_FIRST
    speech_s = 9 * step_s  # speech tokens 2..10 of the 10-token first block
    ms = lambda s: round(1e3 * s, 1)  # noqa: E731
    return {
        "prefill": ms(marks["prefill_done"] - t_commit),
        "text_steps": ms(marks["first_speech_token"] - marks["prefill_done"]),
        "speech_steps_est": ms(speech_s),
        "first_block_est": ms(marks["first_pcm"] - marks["first_speech_token"] - speech_s),
        "send": ms(first_t - marks["first_pcm"]),
        "lm_step_ms": ms(step_s),
        "total": ms(first_t - t_commit),
    }


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 1)


async def drive_engine(check: Check, fig: dict) -> None:
    from pipeline.engine.config import EngineConfig
    from pipeline.engine.thread import GLMVoiceResponder
    from pipeline.responder import SessionSettings

    levels = (1, 2, 4) if check.tiny else (1, 4, 16, 32)
    engine_log = logging.getLogger("pipeline")  # its warm-up steps and their seconds, in the output
    if not engine_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("  engine log: %(name)s: %(message)s"))
        engine_log.addHandler(handler)
        engine_log.setLevel(logging.INFO)
    cfg = EngineConfig(
        demo_weights_dir=str(demo_root()),
        device=str(check.device),
        max_calls_batched=max(levels),
        max_calls=max(levels),
        compile_budget_s=check.args.compile_budget_s,
    )
    responder = GLMVoiceResponder(cfg)
    t0 = time.monotonic()
    await responder.start()
    fig["start_s"] = round(time.monotonic() - t0, 1)
    details = responder.info().details
    fig["engine"] = {k: details[k] for k in ("weights", "device", "dtype") if k in details}
    check.log(f"engine: ready in {fig['start_s']} s")
    try:
        for n in levels:
            if (
                n >= 16
                and check.left_s() < (0.3 if n == 16 else 0.45) * SHARES["engine"] * check.args.budget_s
            ):
                fig[f"calls_{n}"] = "skipped: budget"
                continue
            rounds = 3 if n == 1 else 1
            results = []
            for r in range(rounds):
                sampler = StackSampler() if n == 1 and r == 0 else None  # where the first turn's time goes
                sessions = [responder.open_session(f"check-{n}-{r}-{i}", SessionSettings()) for i in range(n)]
                results += await asyncio.gather(*(one_turn(s, "Hello, who are you?") for s in sessions))
                if sampler is not None:
                    fig["first_turn_stacks"] = sampler.stop()
                for s in sessions:
                    await s.close()
            first = [x["first_pcm_ms"] for x in results if x["first_pcm_ms"] is not None]
            fig[f"calls_{n}"] = {
                "turns": len(results),
                "first_pcm_ms_p50": percentile(first, 50),
                "first_pcm_ms_p95": percentile(first, 95),
                "worst_gap_ms": round(max(x["worst_gap_ms"] for x in results), 1),
                "every_call_ahead_of_playback": all(x["worst_gap_ms"] <= 0.0 for x in results),
                "every_gap_within_100ms": all(x["worst_gap_ms"] <= 100.0 for x in results),  # the target
                "audio_s_per_reply": round(statistics.mean(x["audio_s"] for x in results), 2),
                "per_call": [
                    {
                        "first_pcm_ms": round(x["first_pcm_ms"] or -1, 1),
                        "worst_gap_ms": round(x["worst_gap_ms"], 1),
                    }
                    for x in results
                ],
            }
            if n == 1:  # the last of the three: the first turn after start pays one-off costs
                fig["first_audio_budget_1_call_ms"] = results[-1]["budget_ms"]
                fig["first_audio_budget_first_turn_ms"] = results[0]["budget_ms"]  # where they go
            check.log(f"engine: {n} concurrent calls: {fig[f'calls_{n}']}")
    finally:
        await responder.stop()


def section_engine(check: Check, fig: dict) -> None:
    import pipeline.engine.models as models_mod

    original = models_mod.load_models
    if not check.tiny:  # the engine thread loads through this name: hand it the full-size random models
        models_mod.load_models = lambda cfg, transcription=None: full_size_models(check)
    try:
        asyncio.run(drive_engine(check, fig))
    finally:
        models_mod.load_models = original


# Whisper large-v3-turbo's sizes (its config.json: encoder_layers, decoder_layers, d_model, heads, ffn_dim).
TURBO_DIMS = dict(d_model=1280, encoder_layers=32, decoder_layers=4, heads=20, ffn_dim=5120)


def section_transcription(check: Check, fig: dict) -> None:
    """The transcription stage at large-v3-turbo's size (random weights: babble up to 224 tokens a window,
    so the time per token is the figure; a real transcript of fast speech is ~4 tokens/s of audio)."""
    from pipeline.transcription.model import Whisper
    from pipeline.weights.random_whisper import write_random_checkpoint

    dtype = torch.float32 if check.tiny else torch.float16
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_checkpoint(Path(tmp) / "whisper", **({} if check.tiny else TURBO_DIMS))
        whisper = Whisper.from_pretrained(folder, check.device, dtype)
    fig["params_m"] = round(sum(p.numel() for p in whisper.model.parameters()) / 1e6, 1)
    fig["dtype"] = str(dtype).removeprefix("torch.")
    rng = np.random.default_rng(0)
    for seconds in (5, 30):
        pcm = (0.1 * rng.standard_normal(16000 * seconds)).astype(np.float32)
        whisper.transcribe(pcm, language="en")  # warm-up
        runs = [whisper.transcribe(pcm, language="en") for _ in range(3)]
        compute = statistics.median(r.compute_s for r in runs)
        tokens = statistics.median(r.tokens for r in runs)
        fig[f"clip_{seconds}s"] = {
            "compute_s": round(compute, 3),
            "tokens": tokens,
            "ms_per_token": round(1e3 * compute / max(tokens, 1), 2),
            "s_per_s_of_speech": round(compute / seconds, 4),
        }
        check.log(f"transcription: {seconds} s clip: {fig[f'clip_{seconds}s']}")
    if check.device.type == "cuda":
        fig["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(check.device) / 1e9, 2)


SECTIONS: dict[str, Callable[[Check, dict], None]] = {
    "parity": section_parity,
    "lm": section_lm,
    "int4": section_int4,
    "stages": section_stages,
    "engine": section_engine,
    "transcription": section_transcription,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md ($OUT)")
    parser.add_argument("--tiny", action="store_true", help="every section on the CPU with tiny models")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (ignored with --tiny)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds for all sections together")
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    parser.add_argument(
        "--compile-budget-s", type=float, default=60.0, help="bound of each compile warm-up (LM, engine)"
    )
    parser.add_argument(
        "--compile-probe", action="store_true", help=argparse.SUPPRESS
    )  # compile_probe's child
    parser.add_argument("--slots", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, default=2048, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_probe:
        return run_compile_probe(args)
    if (
        not args.tiny
    ):  # a cold compile cache: what a first start pays (the warm figure comes from a new process)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu_check_inductor_")
    check = Check(args)
    if check.device.type == "cuda":
        torch.cuda.set_device(check.device)
    else:
        torch.set_num_threads(1)  # tiny models: thread hand-offs dominate (pipeline/engine/models.py)
    check.log(f"machine: {check.report['machine']}")
    check.write()
    for name in args.only.split(",") if args.only else SECTIONS:
        with torch.inference_mode(name not in ("engine",)):
            check.run(name, SECTIONS[name])
    # The GPU machine has none of the server's media stack: engine mode must not import it (soxr is left out:
    # transformers imports it itself when it is installed).
    check.report["server_only_modules_imported"] = sorted(
        {"aiortc", "av", "onnxruntime", "silero_vad", "server"} & set(sys.modules)
    )
    check.write()
    statuses = {k: v["status"] for k, v in check.report["sections"].items()}
    check.log(f"done: {statuses}; report in {check.out}")
    return 0 if all(s in ("ok", "skipped") for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

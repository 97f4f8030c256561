"""Decoder cost at the release's sizes with random weights (compute does not depend on weight values).

Sizes from glm-4-voice-decoder/config.yaml (REFERENCE.md §5.1): flow encoder 512-d x 6, estimator 256
channels with 12 mid blocks (111.2 M params), HiFT base 512 with 8 harmonics (20.4 M). Prints:
  1. offline 10 tokens (one finalising call): total, flow, HiFT, real-time factor;
  2. a streamed reply (default 30 s = 375 tokens, blocks 10, 20, 20, ...): every block's time against
     the reply length so far, time to first audio, RTF -- for the official semantics (re-encode every
     call), with the encoder cache (same output), and with bounded prompt windows (`max_prompt_tokens`,
     changes output: the difference to the unbounded stream is printed next to the speed-up);
  3. ratios against the official figures in docs/baseline.md (constants below).

    .venv/bin/python bench/bench_decoder.py              # CPU, fp32, 2 threads, 30 s reply
    .venv/bin/python bench/bench_decoder.py --quick      # 60-token reply, one window (checks it runs)
    .venv/bin/python bench/bench_decoder.py --device cuda --dtype bfloat16   # GPU (not measured here)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.decoder.model import SpeechDecoder  # noqa: E402
from pipeline.decoder.stream import DecoderStream, synthesize  # noqa: E402
from pipeline.weights.random_decoder import random_decoder  # noqa: E402

# docs/baseline.md, "Decoder": official THUDM/GLM-4-Voice @ eb00ce9, same sizes, random weights, fp32,
# torch.set_num_threads(2), 2-core Xeon (AVX-512, KVM); medians (offline) / single runs (streaming).
OFFICIAL_OFFLINE_10_TOKENS_S = 2.24  # total; of which flow 2.00 s, HiFT 0.29 s
OFFICIAL_OFFLINE_10_FLOW_S = 2.00
OFFICIAL_OFFLINE_10_HIFT_S = 0.29
OFFICIAL_FIRST_CALL_10_S = (1.9, 2.8)  # original demo schedule 10, 20, 20...: first call (time to first audio)
OFFICIAL_REPLY_200_TOKENS_S = (155.0, 162.0)  # same schedule, whole 200-token (16 s) reply, RTF ~10


@dataclass
class BlockTiming:
    prompt_tokens: int
    new_tokens: int
    seconds: float
    hift_seconds: float
    audio_seconds: float


class Clock:
    """Wall time of the vocoder inside a block (forward hooks), synchronising on CUDA."""

    def __init__(self, dec: SpeechDecoder):
        self.dec, self.hift_s, self._t0 = dec, 0.0, 0.0
        dec.hift.register_forward_pre_hook(lambda *_: self._start())
        dec.hift.register_forward_hook(lambda *_: self._stop())

    def sync(self) -> None:
        if self.dec.device.type == "cuda":
            torch.cuda.synchronize(self.dec.device)

    def _start(self) -> None:
        self.sync()
        self._t0 = time.perf_counter()

    def _stop(self) -> None:
        self.sync()
        self.hift_s += time.perf_counter() - self._t0


def schedule_blocks(total: int, schedule: tuple[int, ...]) -> list[int]:
    blocks, i = [], 0
    while sum(blocks) < total:
        blocks.append(min(schedule[min(i, len(schedule) - 1)], total - sum(blocks)))
        i += 1
    return blocks


def run_reply(dec: SpeechDecoder, clock: Clock, tokens: list[int], schedule: tuple[int, ...],
              **settings) -> tuple[list[BlockTiming], np.ndarray, torch.Tensor]:
    """Stream a reply block by block (what push() does); returns timings, audio and the reply's mel."""
    stream = DecoderStream(dec, schedule=schedule, **settings)
    blocks = schedule_blocks(len(tokens), schedule)
    timings, audio, mels, done = [], [], [], 0
    for k, n in enumerate(blocks):
        clock.hift_s = 0.0
        clock.sync()
        t0 = time.perf_counter()
        out = stream.decode_block(tokens[done:done + n], finalize=k == len(blocks) - 1)
        clock.sync()
        seconds = time.perf_counter() - t0
        timings.append(BlockTiming(done, n, seconds, clock.hift_s, len(out.audio) / dec.sample_rate_hz))
        audio.append(out.audio)
        mels.append(out.mel[:, :, dec.cfg.mel_cache_frames if k else 0:].float().cpu())
        done += n
    return timings, np.concatenate(audio), torch.cat(mels, dim=2)


def probe_block(dec: SpeechDecoder, clock: Clock, prompt_tokens: int, new_tokens: int, repeats: int,
                **settings) -> tuple[float, float]:
    """Cost of one non-final block of `new_tokens` after a reply of `prompt_tokens` (state filled with
    random values: cost does not depend on them). Returns median (total, hift) seconds."""
    rng = np.random.default_rng(prompt_tokens)
    times, hifts = [], []
    for _ in range(repeats):
        stream = DecoderStream(dec, **settings)
        st = stream.state
        if prompt_tokens:
            st.prompt_tokens = rng.integers(0, dec.num_tokens, prompt_tokens).tolist()
            frames = dec.cfg.flow.frames_for(prompt_tokens) - dec.cfg.mel_overlap_frames
            st.prompt_mel = torch.randn(1, 80, frames, device=dec.device)
            st.mel_overlap = torch.randn(1, 80, dec.cfg.mel_overlap_frames, device=dec.device)
            st.cache_mel, st.cache_source = st.prompt_mel[:, :, -1:], torch.zeros(1, 1, 256, device=dec.device)
            st.blocks_done = 1
            if stream.settings.cache_encoder:  # the cache a real stream would have built on earlier blocks
                ids = torch.tensor(st.prompt_tokens, device=dec.device)
                with torch.inference_mode():
                    dec.flow.mu(ids, dec.cfg.flow.frames_for(prompt_tokens), st.flow_cache)
        clock.hift_s = 0.0
        clock.sync()
        t0 = time.perf_counter()
        stream.decode_block(rng.integers(0, dec.num_tokens, new_tokens).tolist(), finalize=False)
        clock.sync()
        times.append(time.perf_counter() - t0)
        hifts.append(clock.hift_s)
    return float(np.median(times)), float(np.median(hifts))


def encoder_seconds(dec: SpeechDecoder, prompt_tokens: int, new_tokens: int, cached: bool, repeats: int) -> float:
    """Embedding + encoder + projection + regulator of one block: the part the encoder cache shortens."""
    from pipeline.decoder.flow import FlowCache

    ids = torch.randint(0, dec.num_tokens, (prompt_tokens + new_tokens,), device=dec.device)
    frames = dec.cfg.flow.frames_for(prompt_tokens + new_tokens)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            cache = FlowCache()
            if cached and prompt_tokens:
                dec.flow.mu(ids[:prompt_tokens], dec.cfg.flow.frames_for(prompt_tokens), cache)
            t0 = time.perf_counter()
            dec.flow.mu(ids, frames, cache if cached else None)
            if dec.device.type == "cuda":
                torch.cuda.synchronize(dec.device)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def offline(dec: SpeechDecoder, clock: Clock, n: int, repeats: int) -> tuple[float, float]:
    times, hifts = [], []
    for _ in range(repeats):
        clock.hift_s = 0.0
        clock.sync()
        t0 = time.perf_counter()
        synthesize(dec, list(range(n)))
        clock.sync()
        times.append(time.perf_counter() - t0)
        hifts.append(clock.hift_s)
    return float(np.median(times)), float(np.median(hifts))


def print_reply(name: str, timings: list[BlockTiming]) -> None:
    total = sum(t.seconds for t in timings)
    audio = sum(t.audio_seconds for t in timings)
    hift = sum(t.hift_seconds for t in timings)
    print(f"\n[{name}] {len(timings)} blocks, {sum(t.new_tokens for t in timings)} tokens, {audio:.2f} s audio: "
          f"compute {total:.2f} s, RTF {total / audio:.2f}, first block {timings[0].seconds:.3f} s, "
          f"HiFT share {hift / total:.0%}")
    print("  block  prompt_tok  new_tok  seconds  flow_s  hift_s  audio_s")
    for k, t in enumerate(timings):
        print(f"  {k:5d}  {t.prompt_tokens:10d}  {t.new_tokens:7d}  {t.seconds:7.3f}  "
              f"{t.seconds - t.hift_seconds:6.3f}  {t.hift_seconds:6.3f}  {t.audio_seconds:7.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reply-tokens", type=int, default=375, help="streamed reply length (375 = 30 s)")
    ap.add_argument("--windows", default="100,50", help="max_prompt_tokens values to try, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="offline repeats (median)")
    ap.add_argument("--quick", action="store_true", help="60-token reply, one window, one offline repeat")
    ap.add_argument("--probe", default="", help="instead of whole replies: cost of one 20-token block after "
                    "these reply lengths (tokens, comma-separated), e.g. 0,100,200,355 for a 30 s reply")
    args = ap.parse_args(argv)
    if args.quick:
        args.reply_tokens, args.windows, args.repeats = 60, "20", 1
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dec = random_decoder(seed=0, device=args.device, dtype=dtype)
    clock = Clock(dec)
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name(dec.device) if dec.device.type == "cuda" else f"CPU {cpu}"
    print(f"decoder bench: {dev}, {args.threads} threads, {args.dtype}, torch {torch.__version__}")
    print(f"params: flow {sum(p.numel() for p in dec.flow.parameters()) / 1e6:.1f} M, "
          f"HiFT {sum(p.numel() for p in dec.hift.parameters()) / 1e6:.1f} M")
    synthesize(dec, list(range(10)))  # warm-up

    total, hift = offline(dec, clock, 10, args.repeats)
    audio_s = dec.cfg.flow.frames_for(10) * 256 / dec.sample_rate_hz
    print(f"\noffline 10 tokens ({audio_s:.2f} s): {total:.3f} s (flow {total - hift:.3f}, HiFT {hift:.3f}), "
          f"RTF {total / audio_s:.2f}")
    print(f"  official/ours (>1: we are faster): total {OFFICIAL_OFFLINE_10_TOKENS_S / total:.2f} "
          f"(official {OFFICIAL_OFFLINE_10_TOKENS_S} s), flow {OFFICIAL_OFFLINE_10_FLOW_S / (total - hift):.2f}, "
          f"HiFT {OFFICIAL_OFFLINE_10_HIFT_S / hift:.2f}")

    schedule = (10, 20)
    runs = {"official semantics (re-encode)": dict(cache_encoder=False),
            "encoder cache (same output)": dict(cache_encoder=True)}
    for w in (int(x) for x in args.windows.split(",") if x):
        runs[f"window max_prompt_tokens={w}"] = dict(cache_encoder=True, max_prompt_tokens=w)
    if args.probe:
        print("\nper-block cost of a 20-token block vs reply length so far (median of --repeats; variants "
              "interleaved per length so machine drift hits them alike):")
        print("  variant                              prompt_tok  seconds  flow_s  hift_s  encoder+regulator_s")
        for prompt in (int(x) for x in args.probe.split(",")):
            for name, settings in runs.items():
                total, hift = probe_block(dec, clock, prompt, 20, args.repeats, **settings)
                enc = encoder_seconds(dec, prompt, 20, settings["cache_encoder"], args.repeats)
                print(f"  {name:36s} {prompt:10d}  {total:7.3f}  {total - hift:6.3f}  {hift:6.3f}  {enc:19.3f}",
                      flush=True)
        return
    tokens = np.random.default_rng(0).integers(0, dec.num_tokens, args.reply_tokens).tolist()
    results = {}
    for name, settings in runs.items():
        results[name] = run_reply(dec, clock, tokens, schedule, **settings)
        print_reply(name, results[name][0])

    base_t, base_audio, base_mel = results["official semantics (re-encode)"]
    base_total = sum(t.seconds for t in base_t)
    print("\nsummary (same reply, same draws):")
    print("  variant                              compute_s  speed-up  last_nonfinal_s  mel_maxdiff  mel_rel_rms"
          "  audio_maxdiff  audio_rel_rms")
    for name, (timings, audio, mel) in results.items():
        total = sum(t.seconds for t in timings)
        mel_rel = float((mel - base_mel).pow(2).mean().sqrt() / base_mel.std())
        audio_rel = float(np.sqrt(np.mean((audio - base_audio) ** 2)) / base_audio.std())
        print(f"  {name:36s} {total:9.2f}  x{base_total / total:6.2f}  {timings[-2 if len(timings) > 1 else -1].seconds:15.3f}"
              f"  {float((mel - base_mel).abs().max()):11.2e}  {mel_rel:11.2e}  {float(np.abs(audio - base_audio).max()):13.2e}"
              f"  {audio_rel:13.2e}")
    first = base_t[0].seconds
    lo, hi = OFFICIAL_FIRST_CALL_10_S
    print(f"\ntime to first audio (10-token block): {first:.3f} s vs official {lo}-{hi} s: "
          f"official/ours {lo / first:.2f}-{hi / first:.2f}")
    if args.reply_tokens == 200:
        lo, hi = OFFICIAL_REPLY_200_TOKENS_S
        print(f"whole 200-token reply: {base_total:.1f} s vs official {lo}-{hi} s: "
              f"official/ours {lo / base_total:.2f}-{hi / base_total:.2f}")
    print("(mel diffs in natural-log mel units, rel_rms = RMS difference / std of the unbounded output;\n"
          " random weights, so the diffs show sensitivity, not audible quality)")


if __name__ == "__main__":
    main()

"""Decoder cost at the release's sizes with random weights (compute does not depend on weight values).

Sizes from glm-4-voice-decoder/config.yaml (docs/decoder.md): flow encoder 512-d x 6, estimator 256
channels with 12 mid blocks (111.2 M params), HiFT base 512 with 8 harmonics (20.4 M). Prints:
  1. offline 10 tokens (one finalising call): total, flow, HiFT, real-time factor (default mode only);
  2. `--quick`: a 200-token (16 s) reply streamed with our defaults (blocks 10, 20, 40, 80, 80, ...,
     prompt window 50 tokens) against the official computation (the current official demo's blocks
     25, 50, 100, 150, 200, unbounded prompt, re-encoding every call) -- interleaved, --repeats each,
     medians -- and the difference in output: window (ours vs our schedule unbounded), schedule (our
     schedule unbounded vs the official one), both (ours vs official);
  3. `--long`: every block of a 2-minute (1500-token) reply with our defaults: seconds, estimator
     frames, seconds per token of audio -- the check that per-block cost stays flat (run it once).
  4. `--graphs`: the first --graph-blocks full blocks of a reply with our defaults, eager then through
     pipeline/decoder/graphs.py (CUDA graphs on CUDA; on the CPU their static-buffer path, uncaptured:
     a sanity check of its overhead), interleaved, --repeats each: seconds per block and the largest
     audio difference (same draws).
  5. `--batch`: --batch-size replies' next blocks (8 first blocks of 10 tokens by default) decoded as one
     batch (pipeline/decoder/batch.py `decode_blocks`) against the same blocks one by one, in one
     process, interleaved, --repeats each: both times (medians), the ratio, the largest audio difference.
     Replies can first be given histories (`--batch-prompts 0,30`: cycled over the replies, decoded
     untimed), so the timed blocks differ in size and the batch is padded.

    .venv/bin/python bench/bench_decoder.py --quick          # ~5-10 min on 2 CPU threads
    .venv/bin/python bench/bench_decoder.py --long           # ~8 min on 2 CPU threads
    .venv/bin/python bench/bench_decoder.py --device cuda --dtype bfloat16 --quick --long
    .venv/bin/python bench/bench_decoder.py --graphs --graph-blocks 4 --repeats 2   # ~1 min on 2 CPU threads
    .venv/bin/python bench/bench_decoder.py --batch --repeats 2 --threads 1    # ~2 min on a loaded CPU thread
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.decoder.batch import BlockJob, decode_blocks, decode_one  # noqa: E402
from pipeline.decoder.graphs import prepare_graphs  # noqa: E402
from pipeline.decoder.model import SpeechDecoder  # noqa: E402
from pipeline.decoder.stream import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_SCHEDULE, DecoderStream, synthesize  # noqa: E402
from pipeline.weights.random_decoder import random_decoder  # noqa: E402

OFFICIAL_DEMO_SCHEDULE = (25, 50, 100, 150, 200)  # THUDM/GLM-4-Voice web_demo.py block sizes
# The official computation: unbounded prompt, every call re-encodes. legacy_prompt=False (the fix of the
# upstream pull request 86, docs/decoder.md) keeps the output aligned with ours for the difference; it feeds
# back one frame per seam fewer than the demo, so if anything it makes the official side a little cheaper.
OFFICIAL = dict(
    schedule=OFFICIAL_DEMO_SCHEDULE, max_prompt_tokens=None, cache_encoder=False, legacy_prompt=False
)
OURS: dict = {}  # the DecoderStream defaults
OURS_UNBOUNDED = dict(max_prompt_tokens=None)  # our schedule, official prompt: isolates the window's effect


@dataclass
class BlockTiming:
    prompt_tokens: int
    new_tokens: int
    seconds: float
    hift_seconds: float
    encoder_seconds: float  # embedding + encoder + projection + length regulator
    estimator_frames: int  # frames each of the block's estimator passes integrates
    audio_seconds: float


class Clock:
    """Wall time of the vocoder and of the flow's encoder part inside a block (forward hooks,
    synchronising on CUDA), and the frames the estimator sees."""

    def __init__(self, dec: SpeechDecoder):
        self.dec = dec
        self.seconds = {"hift": 0.0, "encoder": 0.0}
        self.estimator_frames = 0
        self._t0 = 0.0
        for name, module in (
            ("hift", dec.hift),
            ("encoder", dec.flow.encoder),
            ("encoder", dec.flow.length_regulator),
        ):
            module.register_forward_pre_hook(lambda *_: self._start())
            module.register_forward_hook(lambda *_, name=name: self._stop(name))
        dec.flow.decoder.estimator.register_forward_pre_hook(lambda _m, args: self._frames(args[0]))

    def reset(self) -> None:
        self.seconds = {"hift": 0.0, "encoder": 0.0}
        self.estimator_frames = 0

    def sync(self) -> None:
        if self.dec.device.type == "cuda":
            torch.cuda.synchronize(self.dec.device)

    def _frames(self, x: torch.Tensor) -> None:
        self.estimator_frames = max(self.estimator_frames, x.shape[-1])

    def _start(self) -> None:
        self.sync()
        self._t0 = time.perf_counter()

    def _stop(self, name: str) -> None:
        self.sync()
        self.seconds[name] += time.perf_counter() - self._t0


def machine(dec: SpeechDecoder) -> str:
    if dec.device.type == "cuda":
        return torch.cuda.get_device_name(dec.device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def schedule_blocks(total: int, schedule: tuple[int, ...]) -> list[int]:
    blocks: list[int] = []
    while sum(blocks) < total:
        blocks.append(min(schedule[min(len(blocks), len(schedule) - 1)], total - sum(blocks)))
    return blocks


def run_reply(
    dec: SpeechDecoder, clock: Clock, tokens: list[int], settings: dict, verbose: bool = False
) -> tuple[list[BlockTiming], np.ndarray, torch.Tensor]:
    """Stream a reply block by block (what push() does, the last block finalising); returns timings,
    audio and the reply's vocoded mel (seam frames removed). `verbose`: print each block when done."""
    stream = DecoderStream(dec, **settings)
    blocks = schedule_blocks(len(tokens), stream.settings.schedule)
    timings, audio, mels, done = [], [], [], 0
    for k, n in enumerate(blocks):
        clock.reset()
        clock.sync()
        t0 = time.perf_counter()
        out = stream.decode_block(tokens[done : done + n], finalize=k == len(blocks) - 1)
        clock.sync()
        timings.append(
            BlockTiming(
                done,
                n,
                time.perf_counter() - t0,
                clock.seconds["hift"],
                clock.seconds["encoder"],
                clock.estimator_frames,
                len(out.audio) / dec.sample_rate_hz,
            )
        )
        if verbose:
            print_block(k, timings[-1])
        audio.append(out.audio)
        mels.append(out.mel[:, :, dec.cfg.mel_cache_frames if k else 0 :].float().cpu())
        done += n
    return timings, np.concatenate(audio), torch.cat(mels, dim=2)


def offline(dec: SpeechDecoder, clock: Clock, n: int, repeats: int) -> None:
    times, hifts = [], []
    for _ in range(repeats):
        clock.reset()
        clock.sync()
        t0 = time.perf_counter()
        synthesize(dec, list(range(n)))
        clock.sync()
        times.append(time.perf_counter() - t0)
        hifts.append(clock.seconds["hift"])
    total, hift = statistics.median(times), statistics.median(hifts)
    audio_s = dec.cfg.flow.frames_for(n) * 256 / dec.sample_rate_hz
    print(
        f"\noffline {n} tokens ({audio_s:.2f} s audio), median of {repeats}: {total:.3f} s "
        f"(flow {total - hift:.3f}, HiFT {hift:.3f}), RTF {total / audio_s:.2f}"
    )


BLOCK_HEADER = (
    "  block  prompt_tok  new_tok  est_frames  seconds  s_per_token  estimator_s  encoder_s  hift_s"
)


def print_block(k: int, t: BlockTiming) -> None:
    est = t.seconds - t.hift_seconds - t.encoder_seconds
    print(
        f"  {k:5d}  {t.prompt_tokens:10d}  {t.new_tokens:7d}  {t.estimator_frames:10d}  {t.seconds:7.2f}  "
        f"{t.seconds / t.new_tokens:11.3f}  {est:11.2f}  {t.encoder_seconds:9.3f}  {t.hift_seconds:6.2f}",
        flush=True,
    )


def print_blocks(name: str, timings: list[BlockTiming], rows: bool = True) -> None:
    total = sum(t.seconds for t in timings)
    audio = sum(t.audio_seconds for t in timings)
    print(
        f"\n[{name}] {len(timings)} blocks, {sum(t.new_tokens for t in timings)} tokens, {audio:.2f} s "
        "audio: "
        f"compute {total:.2f} s, RTF {total / audio:.2f}, first block {timings[0].seconds:.3f} s"
    )
    if rows:
        print(BLOCK_HEADER)
        for k, t in enumerate(timings):
            print_block(k, t)


def rel_rms(a: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    a, ref = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.sqrt(np.mean((a - ref) ** 2)) / np.sqrt(np.mean(ref**2)))


def compare_200(dec: SpeechDecoder, clock: Clock, repeats: int) -> None:
    tokens = np.random.default_rng(0).integers(0, dec.num_tokens, 200).tolist()
    totals: dict[str, list[float]] = {"ours": [], "official": []}
    firsts: dict[str, list[float]] = {"ours": [], "official": []}
    outputs = {}
    for r in range(repeats):  # interleaved so machine drift hits both alike
        for name, settings in (("ours", OURS), ("official", OFFICIAL)):
            timings, audio, mel = run_reply(dec, clock, tokens, settings)
            totals[name].append(sum(t.seconds for t in timings))
            firsts[name].append(timings[0].seconds)
            outputs[name] = (audio, mel)
            print(
                f"  run {r + 1} {name:8s}: {totals[name][-1]:7.1f} s, first block {firsts[name][-1]:.2f} s "
                f"({timings[0].new_tokens} tokens), blocks {[t.new_tokens for t in timings]}",
                flush=True,
            )
            if r == 0:
                print_blocks(name, timings)
    timings, audio, mel = run_reply(dec, clock, tokens, OURS_UNBOUNDED)
    outputs["unbounded"] = (audio, mel)
    print(
        "  our schedule, unbounded prompt (output reference, one run): "
        f"{sum(t.seconds for t in timings):.1f} s"
    )
    ours, official = statistics.median(totals["ours"]), statistics.median(totals["official"])
    f_ours, f_official = statistics.median(firsts["ours"]), statistics.median(firsts["official"])
    print(f"\n200-token reply (16 s of audio), medians of {repeats}:")
    print(
        f"  ours {DEFAULT_SCHEDULE} window {DEFAULT_MAX_PROMPT_TOKENS}: {ours:.1f} s   "
        f"official {OFFICIAL_DEMO_SCHEDULE} unbounded: {official:.1f} s   official/ours = "
        f"{official / ours:.2f}"
    )
    print(
        f"  first audio (first block): ours {f_ours:.2f} s ({DEFAULT_SCHEDULE[0]} tokens), official "
        f"{f_official:.2f} s ({OFFICIAL_DEMO_SCHEDULE[0]} tokens), official/ours = {f_official / f_ours:.2f}"
    )
    print("\noutput differences on random weights (RMS of the difference / RMS of the reference):")
    for label, a, b in (
        ("window 50 (ours vs our schedule unbounded)", "ours", "unbounded"),
        ("schedule (our schedule unbounded vs official)", "unbounded", "official"),
        ("both (ours vs official)", "ours", "official"),
    ):
        (audio_a, mel_a), (audio_b, mel_b) = outputs[a], outputs[b]
        print(
            f"  {label:46s} mel {rel_rms(mel_a, mel_b):.2e} (max abs "
            f"{float((mel_a - mel_b).abs().max()):.2e})  "
            f"audio {rel_rms(audio_a, audio_b):.2e} (max abs {float(np.abs(audio_a - audio_b).max()):.2e})"
        )


def long_reply(dec: SpeechDecoder, clock: Clock, tokens_n: int) -> None:
    tokens = np.random.default_rng(1).integers(0, dec.num_tokens, tokens_n).tolist()
    print(f"\n{tokens_n}-token reply, ours, block by block:\n{BLOCK_HEADER}")
    timings, _, _ = run_reply(dec, clock, tokens, OURS, verbose=True)
    print_blocks(f"{tokens_n}-token reply, ours", timings, rows=False)
    capped = [t for t in timings[:-1] if t.new_tokens == DEFAULT_SCHEDULE[-1]]  # full-size, non-final blocks
    if capped:
        secs = [t.seconds for t in capped]
        print(
            f"\n{len(capped)} full-size blocks ({DEFAULT_SCHEDULE[-1]} tokens) from prompt "
            f"{capped[0].prompt_tokens} to {capped[-1].prompt_tokens} tokens: seconds min {min(secs):.2f}, "
            f"median {statistics.median(secs):.2f}, max {max(secs):.2f}; last/first "
            f"{secs[-1] / secs[0]:.2f}; "
            "estimator frames "
            f"{min(t.estimator_frames for t in capped)}-{max(t.estimator_frames for t in capped)}"
        )


def graphs_vs_eager(dec: SpeechDecoder, blocks: int, repeats: int) -> None:
    n = sum(DEFAULT_SCHEDULE[min(k, len(DEFAULT_SCHEDULE) - 1)] for k in range(blocks))
    tokens = np.random.default_rng(2).integers(0, dec.num_tokens, n).tolist()
    t0 = time.perf_counter()
    graphs = prepare_graphs(dec, capture=None)  # the stream defaults' shapes, as the engine's warm-up
    dec.graphs = None
    print(
        f"\n{blocks} full blocks ({n} tokens), ours; {len(graphs) if graphs else 0} shapes recorded in "
        f"{time.perf_counter() - t0:.1f} s "
        f"({'CUDA graphs' if graphs and graphs.captured else 'static buffers'})"
    )
    runs: dict[str, list[list[float]]] = {"eager": [], "graphs": []}
    audio: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name in runs:
            dec.graphs = graphs if name == "graphs" else None
            stream, secs, out = DecoderStream(dec, seed=0), [], []
            for size in schedule_blocks(n, DEFAULT_SCHEDULE):
                start = stream.tokens_decoded
                if dec.device.type == "cuda":
                    torch.cuda.synchronize(dec.device)
                t1 = time.perf_counter()
                out.append(stream.decode_block(tokens[start : start + size], finalize=False).audio)
                if dec.device.type == "cuda":
                    torch.cuda.synchronize(dec.device)
                secs.append(time.perf_counter() - t1)
                print(f"  {name} block {len(secs) - 1}: {secs[-1]:.3f} s", flush=True)
            runs[name].append(secs)
            audio[name] = np.concatenate(out)
    dec.graphs = None
    med = {name: [statistics.median(r[k] for r in rs) for k in range(blocks)] for name, rs in runs.items()}
    print("  block  eager_s  graphs_s  eager/graphs")
    for k in range(blocks):
        print(
            f"  {k:5d}  {med['eager'][k]:7.3f}  {med['graphs'][k]:8.3f}  "
            f"{med['eager'][k] / med['graphs'][k]:12.2f}"
        )
    print(
        "  audio max abs difference graphs vs eager: "
        f"{float(np.abs(audio['graphs'] - audio['eager']).max()):.2e}"
    )


def _sync(dec: SpeechDecoder) -> None:
    if dec.device.type == "cuda":
        torch.cuda.synchronize(dec.device)


def batch_vs_alone(dec: SpeechDecoder, size: int, prompts: list[int], repeats: int) -> None:
    rng = np.random.default_rng(3)
    histories = [rng.integers(0, dec.num_tokens, prompts[k % len(prompts)]).tolist() for k in range(size)]
    blocks = [rng.integers(0, dec.num_tokens, 200).tolist() for _ in range(size)]

    def jobs() -> list[BlockJob]:
        streams = [DecoderStream(dec, seed=k) for k in range(size)]
        for stream, history in zip(streams, histories, strict=True):
            stream.push(history)  # untimed: the reply so far
        return [BlockJob(s, b[: s.tokens_to_next_block], False) for s, b in zip(streams, blocks, strict=True)]

    print(
        f"\n{size} replies' next blocks ({[len(j.tokens) for j in jobs()]} tokens after "
        f"{[len(h) for h in histories]}), one batch vs one by one, {repeats} runs each, interleaved"
    )
    secs: dict[str, list[float]] = {"alone": [], "batch": []}
    audio: dict[str, list] = {}
    for _ in range(repeats):
        for name in secs:
            todo = jobs()
            _sync(dec)
            t0 = time.perf_counter()
            out = decode_blocks(todo) if name == "batch" else [decode_one(j) for j in todo]
            _sync(dec)
            secs[name].append(time.perf_counter() - t0)
            audio[name] = out
            print(f"  {name}: {secs[name][-1]:.2f} s", flush=True)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(audio["batch"], audio["alone"], strict=True))
    alone, batch = statistics.median(secs["alone"]), statistics.median(secs["batch"])
    print(
        f"  one by one {alone:.2f} s, one batch {batch:.2f} s (medians): "
        f"one by one / batch = {alone / batch:.2f}"
    )
    print(f"  audio max abs difference batch vs one by one: {diff:.2e}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side (median)")
    ap.add_argument("--quick", action="store_true", help="only the 200-token comparison")
    ap.add_argument("--long", action="store_true", help="only the 2-minute per-block check")
    ap.add_argument("--long-tokens", type=int, default=1500, help="reply length for --long (1500 = 2 min)")
    ap.add_argument(
        "--graphs", action="store_true", help="only eager vs pipeline/decoder/graphs.py per block"
    )
    ap.add_argument("--graph-blocks", type=int, default=6, help="full blocks for --graphs")
    ap.add_argument("--batch", action="store_true", help="only a batch of blocks vs the same one by one")
    ap.add_argument("--batch-size", type=int, default=8, help="replies (blocks) for --batch")
    ap.add_argument(
        "--batch-prompts", default="0", help="tokens each reply has already decoded, cycled (--batch)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dec = random_decoder(seed=0, device=args.device, dtype=getattr(torch, args.dtype))
    clock = Clock(dec)
    print(f"decoder bench: {machine(dec)}, {args.threads} threads, {args.dtype}, torch {torch.__version__}")
    print(
        f"params: flow {sum(p.numel() for p in dec.flow.parameters()) / 1e6:.1f} M, "
        f"HiFT {sum(p.numel() for p in dec.hift.parameters()) / 1e6:.1f} M"
    )
    synthesize(dec, list(range(10)))  # warm-up
    if args.graphs:
        return graphs_vs_eager(dec, args.graph_blocks, args.repeats)
    if args.batch:
        prompts = [int(n) for n in args.batch_prompts.split(",")]
        return batch_vs_alone(dec, args.batch_size, prompts, args.repeats)
    if not (args.quick or args.long):
        offline(dec, clock, 10, args.repeats)
    if args.quick or not args.long:
        compare_200(dec, clock, args.repeats)
    if args.long:
        long_reply(dec, clock, args.long_tokens)


if __name__ == "__main__":
    main()

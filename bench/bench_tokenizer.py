"""Speech tokenizer cost at the REAL sizes (random weights): offline tokenize() and the end-of-turn flush().

    .venv/bin/python bench/bench_tokenizer.py            # CPU, float32, 2 threads (as docs/baseline.md)
    .venv/bin/python bench/bench_tokenizer.py --quick    # fewer repeats
    .venv/bin/python bench/bench_tokenizer.py --device cuda --dtype bfloat16

Compute does not depend on weight values, so random weights at glm-4-voice-tokenizer's sizes (d_model 1280,
16 layers, 20 heads, FFN 5120, codebook 16384; 343.6 M parameters) cost what the real checkpoint costs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tokenizer.log_mel import LogMelSettings
from pipeline.tokenizer.stream import TokenizerStream
from pipeline.tokenizer.tokenizer import SpeechTokenizer
from pipeline.tokenizer.whisper_vq import SpeechTokenizerConfig, WhisperVQEncoder
from pipeline.weights.random_tokenizer import calibration_audio, random_weights

# Official extract_speech_token, same sizes, random weights, fp32, 2 threads, 2-core Xeon (AVX-512):
# docs/baseline.md, "Speech tokenizer" table (median seconds per call).
OFFICIAL_SECONDS = {1.0: 0.284, 4.0: 0.703, 10.0: 1.372, 30.0: 4.610, 31.0: 9.987}
# The official path has no streaming: at the end of a 5 s turn it tokenizes all 5 s. docs/baseline.md has no 5
# s row; linear interpolation between its 4 s and 10 s rows.
OFFICIAL_5S_END_OF_TURN = 0.703 + (1.372 - 0.703) * (5.0 - 4.0) / (10.0 - 4.0)

REAL = SpeechTokenizerConfig(
    d_model=1280,
    num_heads=20,
    ffn_dim=5120,
    num_layers=16,
    num_mel_bins=128,
    max_positions=1500,
    pool_frames=4,
    block_frames=200,
    codebook_size=16384,
    mel=LogMelSettings(sample_rate_hz=16000, n_fft=400, hop_samples=160, n_mels=128, segment_samples=480000),
)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = "?"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
        f"{gpu}, commit {commit}"
    )


def build(device: torch.device, dtype: torch.dtype) -> SpeechTokenizer:
    generator = torch.Generator().manual_seed(0)
    encoder = WhisperVQEncoder(REAL).eval()
    random_weights(encoder, generator)
    # Codewords around the pooled states of a 4 s clip (as write_random_checkpoint does), not a N(0, 1/d)
    # cloud whose near-equal distances make every argmin a tie; timing is the same either way.
    probe = SpeechTokenizer(REAL, encoder, torch.device("cpu"))
    seg = probe.new_segment()
    seg.audio[:64000] = calibration_audio(4.0, 16000, np.random.default_rng(1))
    seg.n_samples = 64000
    pooled = []

    def capture(h: torch.Tensor, code_sq: torch.Tensor) -> torch.Tensor:
        pooled.append(h[0].view(-1, REAL.pool_frames, REAL.d_model).mean(1))
        return torch.zeros(1, h.shape[1] // REAL.pool_frames, dtype=torch.long)

    encoder.quantize = capture
    probe.finish_segment(seg)
    del encoder.quantize
    states = pooled[0]  # (50, d)
    with torch.no_grad():
        encoder.codebook.weight.copy_(
            states.mean(0)
            + states.std(0) * torch.randn(REAL.codebook_size, REAL.d_model, generator=generator)
        )
    encoder = encoder.to(device=device, dtype=dtype)
    encoder.codebook.float()
    return SpeechTokenizer(REAL, encoder, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved GFLOP/s of one FFN-shaped matmul (200 x 1280 @ 1280 x 5120) right now: the floor our encoder
    (matmul-bound) can reach on this machine at this moment, so a shared machine's figures can be read."""
    a = torch.randn(200, 1280, device=device, dtype=dtype)
    w = torch.randn(5120, 1280, device=device, dtype=dtype)
    seconds = timed(lambda: [a @ w.T for _ in range(8)], device, 5)
    return 8 * 2 * 200 * 1280 * 5120 / seconds / 1e9


def linear_gflop(seconds: float) -> float:
    """Matmul work of one call (convs, layers' projections + FFN, VQ distances); attention not counted."""
    c = REAL
    mel_frames = -(-int(seconds * 16000) // 1280) * 8
    frames = mel_frames // 2
    per_frame_layer = 2 * (4 * c.d_model**2 + 2 * c.d_model * c.ffn_dim)
    convs = 2 * 3 * c.d_model * (c.num_mel_bins * mel_frames + c.d_model * frames)
    vq = 2 * c.d_model * c.codebook_size * frames // c.pool_frames
    return (frames * c.num_layers * per_frame_layer + convs + vq) / 1e9


def official_style_tokenize(tok: SpeechTokenizer, wav: np.ndarray) -> list[int]:
    """The official algorithm's compute, re-enacted with our weights (not the official code, which is not
    installed here): all 30 s segments in one batch padded to the longest, the whole sequence through every
    layer with the (B, 1, T, T) additive block-causal + padding mask, codeword norms recomputed per call.
    Timed alternately with ours in the same process, so the ratio holds on a busy shared machine."""
    c, enc = tok.config, tok.encoder
    feats = tok.features(wav)  # per segment (n_mels, F_i)
    n_frames = max(f.shape[1] for f in feats)
    batch = torch.stack(
        [torch.nn.functional.pad(f, (0, n_frames - f.shape[1])) for f in feats]
    )  # (B, n_mels, F)
    seg = c.mel.segment_samples
    lengths = [len(wav[s : s + seg]) for s in range(0, len(wav), seg)]
    valid = torch.tensor(
        [math.ceil(math.ceil(n / c.mel.hop_samples) / 2) for n in lengths]
    )  # mask[::160][::2]
    x = enc.embed(batch, True, 0)  # (B, T, d)
    B, T, d = x.shape
    pos = torch.arange(T)
    allowed = (pos[None, :] <= pos[:, None]) | (
        pos[None, :] // c.block_frames == pos[:, None] // c.block_frames
    )
    allowed = allowed[None] & (pos[None, None, :] < valid[:, None, None])  # (B, T, T)
    mask = (1.0 - allowed.float())[:, None] * torch.finfo(torch.float32).min  # (B, 1, T, T)
    for layer in enc.layers:
        a = layer.self_attn
        h = layer.self_attn_layer_norm(x)
        q, k, v = (p(h).view(B, T, c.num_heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        x = x + a.out_proj(o.transpose(1, 2).reshape(B, T, d))
        x = x + layer.fc2(torch.nn.functional.gelu(layer.fc1(layer.final_layer_norm(x))))
    ids = enc.quantize(x, enc.codebook_sq())  # (B, T / pool)
    return [t for i in range(B) for t in ids[i, : -(-lengths[i] // c.samples_per_token)].tolist()]


def bench_offline(
    tok: SpeechTokenizer, audio: np.ndarray, repeats: int, compare: bool, gflops: float
) -> None:
    print(
        "\noffline tokenize(): median seconds per call. floor = matmul work / GEMM rate measured now;"
        "\nofficial-style = the official algorithm re-enacted with our weights, timed alternately with ours"
    )
    print(
        f"{'audio':>6} {'tokens':>6} {'ours s':>8} {'s/s audio':>9} {'floor s':>8} {'log-mel ms':>10} "
        f"{'off-style s':>11} {'ratio':>6} {'official s':>10} {'ratio':>6}"
    )
    for seconds, official in OFFICIAL_SECONDS.items():
        wav = audio[: int(seconds * 16000)]
        ours_tokens, style_tokens = tok.tokenize(wav), official_style_tokenize(tok, wav)  # also warm-up
        if ours_tokens != style_tokens:
            print(
                f"  note: {sum(a != b for a, b in zip(ours_tokens, style_tokens, strict=True))} of "
                f"{len(ours_tokens)} tokens differ between the two paths (float noise near ties)"
            )
        ours_t, style_t = [], []
        for _ in range(repeats):
            ours_t.append(timed(lambda wav=wav: tok.tokenize(wav), tok.device, 1))
            style_t.append(timed(lambda wav=wav: official_style_tokenize(tok, wav), tok.device, 1))
        ours, style = statistics.median(ours_t), statistics.median(style_t)
        fastest = f"  (fastest runs: ours {min(ours_t):.3f} s, official-style {min(style_t):.3f} s)"
        mel = timed(lambda wav=wav: tok.features(wav), tok.device, repeats)
        ratio = f"{official / ours:5.2f}x" if compare else "   n/a"
        floor = (
            sum(linear_gflop(min(30.0, seconds - s)) for s in range(0, int(np.ceil(seconds)), 30)) / gflops
        )
        print(
            f"{seconds:5.0f}s {len(ours_tokens):6d} {ours:8.3f} {ours / seconds:9.3f} {floor:8.3f} "
            f"{mel * 1e3:10.1f} {style:11.3f} {style / ours:5.2f}x {official:10.3f} {ratio}{fastest}"
        )


def stream_turn(tok: SpeechTokenizer, wav: np.ndarray, push_samples: int) -> tuple[float, float, int]:
    """(seconds in push() in total, seconds in flush(), blocks flush() encoded)."""
    stream = TokenizerStream(tok)
    sync(tok.device)
    t0 = time.perf_counter()
    for i in range(0, len(wav), push_samples):
        stream.push(wav[i : i + push_samples])
    sync(tok.device)
    t1 = time.perf_counter()
    stream.flush()
    sync(tok.device)
    return t1 - t0, time.perf_counter() - t1, stream.blocks_encoded_flush


def bench_flush(tok: SpeechTokenizer, audio: np.ndarray, repeats: int, compare: bool) -> None:
    print("\nend of a 5 s turn streamed in 20 ms pushes (median)")
    steady = audio[:80000]  # level steady over the turn: flush encodes only the open 1 s block
    rising = np.concatenate(
        [0.05 * audio[:64000], audio[64000:80000]]
    )  # louder last second: block 0 redone too
    for name, wav in (("steady level", steady), ("louder last second", rising)):
        runs = [stream_turn(tok, wav, 320) for _ in range(repeats + 1)][1:]
        push = statistics.median(r[0] for r in runs)
        flush = statistics.median(r[1] for r in runs)
        fastest = min(r[1] for r in runs)
        ratio = f", {OFFICIAL_5S_END_OF_TURN / flush:.1f}x less than official" if compare else ""
        print(
            f"  {name:20s} flush {flush * 1e3:8.1f} ms (fastest {fastest * 1e3:.1f} ms; {runs[0][2]} blocks)"
            f"{ratio}; all pushes {push:.2f} s for 5 s of audio"
        )
    if compare:
        print(
            f"  official end-of-turn cost for 5 s: {OFFICIAL_5S_END_OF_TURN:.3f} s (interpolated, "
            "docs/baseline.md)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat instead of 3")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (docs/baseline.md used 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    compare = device.type == "cpu" and dtype == torch.float32 and args.threads == 2
    print(f"machine: {machine()}")
    print(
        f"device {device}, dtype {args.dtype}; real sizes, random weights; "
        "ratios vs the official code "
        f"{'shown' if compare else 'not shown (the baseline is CPU fp32, 2 threads)'}"
    )
    tok = build(device, dtype)
    audio = calibration_audio(32.0, 16000, np.random.default_rng(0))
    repeats = 1 if args.quick else 3
    gflops = gemm_gflops(device, dtype)
    print(f"GEMM rate now: {gflops:.0f} GFLOP/s (FFN-shaped matmul)")
    bench_offline(tok, audio, repeats, compare, gflops)
    bench_flush(tok, audio, repeats, compare)
    print(f"GEMM rate at the end: {gemm_gflops(device, dtype):.0f} GFLOP/s (a shared machine drifts)")


if __name__ == "__main__":
    with torch.inference_mode():
        main()

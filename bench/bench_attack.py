"""Hostile callers vs. a victim call: the victim's first audio under each attack, and what each attack
costs the server in CPU, memory and log.

    .venv/bin/python bench/bench_attack.py [--phase-s 8] [--attacks ws_tiny,control,...]

Three processes: the server (`glm4voice serve`, GLM engine on demo weights, CPU unless
GLM4VOICE_MODEL_DEVICE says otherwise), the attacker (bench/attacks.py) and this one, which runs the
victim. Default limits, except: auth on (an API key, so that failed logins exist), `max_calls` 8 (so
that calls parked by one address can fill the server within a phase), host candidates on 127.0.0.1.
Each attack comes from its own loopback address; the victim is 127.0.0.1.

One phase per attack, all in one run, `--phase-s` each: the attack starts, 1 s later the victim dials
(a refused offer is retried every second and counted) and then, until the phase ends, types a short
message and asks for a reply, again and again (one every 1.2 s at most, under the default rate of
`response.create`); its first audio is the time from its `response.create` to the
`output_audio_buffer.started` it receives; it then cancels the reply. Per phase: the victim's first
audio p50 / p95 and its ratio to the no-attack phase, replies with no audio within 20 s, refused
offers; the server's CPU seconds, RSS growth, log growth (bytes, lines, ERROR lines, tracebacks);
the attacker's CPU seconds and counters (what it sent, what the server answered, how its calls ended).
Prints the machine; nothing is asserted.

On one machine the attacker's own CPU competes with the server's: with `--attacker-nice 19` it runs
only on CPU time the server and the victim leave, closer to an attacker on another machine (what the
server spends on the attack is its own CPU column either way). With `--pin` the server runs on the
first half of the CPUs and the victim and the attacker on the rest: the clients' CPU is then never
the server's, and the victim's first audio measures what the attack costs the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from attacks import API_KEY, ATTACKS, AUTH, serve_attacks
from bench_call_path import free_port, machine, pct, wait_healthy

VICTIM_LEAD_S = 1.0  # the attack runs this long before the victim dials
VICTIM_CYCLE_S = 1.2  # at most one reply a second and a bit (the default expensive-event rate is 1/s)
NO_AUDIO_S = 20.0  # a reply with no audio by then is counted lost


@dataclass
class Victim:
    first_audio_ms: list[float] = field(default_factory=list)
    lost: int = 0
    refused: int = 0


async def victim(base: str, end_s: float, out: Victim) -> None:
    from tests.helpers.rtc_client import RealtimeClient

    while True:
        client = RealtimeClient(base, headers=AUTH)
        try:
            await client.connect(listen_only=True)
            break
        except AssertionError:  # the offer was refused (server_full, rate_limited)
            out.refused += 1
            await client.close()
            if time.monotonic() > end_s:
                return
            await asyncio.sleep(1.0)
    try:
        while time.monotonic() < end_s:
            mark, t0 = len(client.events), time.monotonic()
            client.send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "hello, how are you today?"}],
                    },
                }
            )
            client.send({"type": "response.create"})
            try:
                started = await client.wait_for("output_audio_buffer.started", NO_AUDIO_S, after=mark)
                out.first_audio_ms.append((client.event_time(started) - t0) * 1000)
                client.send({"type": "response.cancel"})
                await client.wait_for("response.done", NO_AUDIO_S, after=mark)
            except TimeoutError:
                out.lost += 1
            await asyncio.sleep(max(0.0, t0 + VICTIM_CYCLE_S - time.monotonic()))
    finally:
        await client.hangup()


@dataclass(frozen=True)
class Snapshot:
    cpu_s: float
    attacker_cpu_s: float
    rss_mib: float
    fds: int
    threads: int
    log_bytes: int


def snapshot(server: psutil.Process, log_path: Path, attacker: psutil.Process) -> Snapshot:
    cpu, attacker_cpu = server.cpu_times(), attacker.cpu_times()
    return Snapshot(
        cpu.user + cpu.system,
        attacker_cpu.user + attacker_cpu.system,
        server.memory_info().rss / 2**20,
        server.num_fds(),
        server.num_threads(),
        log_path.stat().st_size,
    )


def log_growth(log_path: Path, start: int) -> dict:
    """Lines, ERROR lines and tracebacks the server logged since byte `start` (JSON lines)."""
    counts = {"lines": 0, "errors": 0, "tracebacks": 0}
    with open(log_path, "rb") as f:
        f.seek(start)
        for line in f:
            counts["lines"] += 1
            counts["errors"] += b'"level": "ERROR"' in line[:200]
            counts["tracebacks"] += b"Traceback (most recent call last)" in line
    return counts


def _notes(notes: dict) -> str:
    return "; ".join(f"{k} {v}" for k, v in sorted(notes.items(), key=lambda kv: -kv[1]))


async def run(args: argparse.Namespace) -> None:
    from server.webrtc.rtc import set_host_addresses

    kinds = ["none", *(args.attacks.split(",") if args.attacks else ATTACKS)]
    unknown = [k for k in kinds[1:] if k not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    demo_dir = Path(tempfile.gettempdir()) / "glm4voice_bench_demo"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GLM4VOICE_WEBRTC_HOST_ADDRESSES": "127.0.0.1",
        "GLM4VOICE_AUTH_API_KEY": API_KEY,
        "GLM4VOICE_LIMITS_MAX_CALLS": "8",
        "GLM4VOICE_MODEL_DEVICE": os.environ.get("GLM4VOICE_MODEL_DEVICE", "cpu"),
        "GLM4VOICE_MODEL_DEMO_WEIGHTS_DIR": os.environ.get("GLM4VOICE_MODEL_DEMO_WEIGHTS_DIR", str(demo_dir)),
    }
    log_path = Path(tempfile.gettempdir()) / f"glm4voice_bench_attack_{port}.log"
    log_file = open(log_path, "w")  # noqa: SIM115 - the server's whole life
    server_cpus, client_cpus = args.cpus = split_cpus(args.pin)
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--log-format", "json"],
        cwd=ROOT,
        env=env,
        stderr=log_file,
        preexec_fn=(lambda: os.sched_setaffinity(0, server_cpus)) if server_cpus else None,
    )
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)  # the victim (this process) and the attacker it starts
    attacker = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--attacker",
        base,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=(lambda: os.nice(args.attacker_nice)) if args.attacker_nice else None,
    )
    attacker_proc = psutil.Process(attacker.pid)
    set_host_addresses(("127.0.0.1",))
    proc = psutil.Process(server.pid)
    rows = []
    try:
        async with aiohttp.ClientSession() as http:
            health = await wait_healthy(http, base, server)
            await victim(base, time.monotonic() + 4, Victim())  # warm-up
            first = snapshot(proc, log_path, attacker_proc)
            for kind in kinds:
                await asyncio.sleep(1.0)  # the previous phase's calls close
                before = snapshot(proc, log_path, attacker_proc)
                notes: dict = {}
                if kind != "none":
                    attacker.stdin.write(f"{kind} {args.phase_s}\n".encode())
                    await attacker.stdout.readline()  # "go"
                end_s = time.monotonic() + args.phase_s
                await asyncio.sleep(VICTIM_LEAD_S)
                result = Victim()
                await victim(base, end_s, result)
                if kind != "none":
                    notes = json.loads(await attacker.stdout.readline())
                after = snapshot(proc, log_path, attacker_proc)
                rows.append((kind, result, before, after, log_growth(log_path, before.log_bytes), notes))
                first_ms = result.first_audio_ms
                print(
                    f"phase {kind}: {len(first_ms)} replies, first audio p50 {pct(first_ms, 0.5):.0f} ms, "
                    f"p95 {pct(first_ms, 0.95):.0f} ms",
                    flush=True,
                )
            await asyncio.sleep(2.0)
            last = snapshot(proc, log_path, attacker_proc)
            async with http.get(base + "/metrics") as r:
                metrics = await r.text()
    finally:
        if attacker.returncode is None:
            attacker.stdin.close()
            attacker.kill()
        server.terminate()
        server.wait(30)
        log_file.close()
    _report(args, health, rows, first, last, metrics, log_path)


def split_cpus(pin: bool) -> tuple[set[int], set[int]]:
    """`--pin`: the server on the first half of this machine's CPUs, the victim and the attacker on the
    rest, so that neither client's CPU is taken from the server (as on separate machines)."""
    if not pin:
        return set(), set()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def _report(args, health, rows, first: Snapshot, last: Snapshot, metrics: str, log_path: Path) -> None:
    server_cpus, client_cpus = args.cpus
    pinned = f"; server on CPUs {sorted(server_cpus)}, clients on {sorted(client_cpus)}" if args.pin else ""
    print(f"machine: {machine()}; attacker nice {args.attacker_nice}{pinned}")
    print(
        f"responder: {health['responder'].get('name')} weights={health['responder'].get('weights')} "
        f"device={health['responder'].get('device')}; phases of {args.phase_s:g} s; server log {log_path}"
    )
    base_p95 = pct(rows[0][1].first_audio_ms, 0.95) if rows[0][0] == "none" else float("nan")
    print(
        "| attack | victim replies | first audio p50 / p95 (ms) | p95 / none | victim lost / refused | "
        "server CPU (s) | attacker CPU (s) | RSS (MiB) | log (KiB, lines, ERROR, tracebacks) | attacker |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, v, before, after, logs, notes in rows:
        p95 = pct(v.first_audio_ms, 0.95)
        described = ATTACKS[kind][1] if kind in ATTACKS else "no attack"
        print(
            f"| {kind}: {described} | {len(v.first_audio_ms)} | "
            f"{pct(v.first_audio_ms, 0.5):.0f} / {p95:.0f} | "
            f"{p95 / base_p95:.2f} | {v.lost} / {v.refused} | {after.cpu_s - before.cpu_s:.1f} | "
            f"{after.attacker_cpu_s - before.attacker_cpu_s:.1f} | "
            f"{before.rss_mib:.0f} -> {after.rss_mib:.0f} | "
            f"{(after.log_bytes - before.log_bytes) / 1024:.0f}, {logs['lines']}, {logs['errors']}, "
            f"{logs['tracebacks']} | {_notes(notes)} |"
        )
    print(
        "server after warm-up -> after all phases (+2 s): "
        f"RSS {first.rss_mib:.0f} -> {last.rss_mib:.0f} MiB, "
        f"fds {first.fds} -> {last.fds}, threads {first.threads} -> {last.threads}, "
        f"log {first.log_bytes / 2**20:.1f} -> {last.log_bytes / 2**20:.1f} MiB"
    )
    for line in metrics.splitlines():
        if line.startswith(
            (
                "glm4voice_calls_ended_total",
                "glm4voice_calls_rejected",
                "glm4voice_events_",
                "glm4voice_turn_errors",
                "glm4voice_address_blocks",
                "glm4voice_blocked_refusals",
            )
        ):
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-s", type=float, default=8.0)
    parser.add_argument("--attacks", default="", help=f"comma-separated, of: {', '.join(ATTACKS)}")
    parser.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        help="run the attacker at this nice value (19: it gets the CPU only when the server and the "
        "victim leave it, as an attacker on another machine would not take the server's CPU)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="server on the first half of the CPUs, victim and attacker on the other half",
    )
    parser.add_argument("--attacker", help=argparse.SUPPRESS)  # the attacker process (internal)
    args = parser.parse_args()
    if args.attacker:
        asyncio.run(serve_attacks(args.attacker))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()

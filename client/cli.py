"""`glm4voice call URL`: the headless client (docs/client.md). Exit codes in client/errors.py."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from client.errors import CallError, ExitCode


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8080")
    audio = p.add_argument_group("audio (default: the default microphone and speaker)")
    audio.add_argument("--wav", type=Path, help="speak this WAV file instead of the microphone, then hang up")
    audio.add_argument(
        "--out",
        type=Path,
        help="write what the assistant says to this WAV file (48 kHz mono) instead of the speaker",
    )
    audio.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help="a typed turn (repeatable; without --wav the microphone stays off)",
    )
    audio.add_argument("--input-device", help="microphone: a sounddevice index or name")
    audio.add_argument("--output-device", help="speaker: a sounddevice index or name")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ptt", action="store_true", help="push-to-talk: Enter starts and ends a turn")
    mode.add_argument(
        "--half-duplex",
        action="store_true",
        help="close the microphone while the assistant speaks (speakers without echo cancellation)",
    )
    p.add_argument(
        "--tail-ms",
        type=float,
        default=300.0,
        help="half-duplex: keep the microphone closed this long after a reply (default 300)",
    )
    p.add_argument("--instructions", help="system instructions for the call")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument(
        "--api-key",
        default=os.environ.get("GLM4VOICE_API_KEY"),
        help="the server's API key (default $GLM4VOICE_API_KEY)",
    )
    auth.add_argument(
        "--client-secret",
        default=os.environ.get("GLM4VOICE_CLIENT_SECRET"),
        help="a client secret ek_... (default $GLM4VOICE_CLIENT_SECRET)",
    )
    p.add_argument(
        "--reconnect-window",
        type=float,
        default=60.0,
        metavar="S",
        help="keep reconnecting this long after a drop (and at start), then exit 5 (default 60)",
    )
    p.add_argument("--json", action="store_true", help="print every event as one JSON line")


def _audio(args: argparse.Namespace):
    """Open the source and the sink first: a bad device fails before any network is touched."""
    from client.audio_io import MicSource, SilentSource, SpeakerSink, WavSink, WavSource

    if args.wav is not None:
        source = WavSource(args.wav)
    elif args.text:
        source = SilentSource()
    else:
        source = MicSource(args.input_device)
    try:
        sink = WavSink(args.out) if args.out is not None else SpeakerSink(args.output_device)
    except CallError:
        source.close()
        raise
    return source, sink


async def _run(args: argparse.Namespace, emit) -> tuple[ExitCode, str]:
    from client.call import Call, CallOptions

    source, sink = _audio(args)
    mode = "push_to_talk" if args.ptt else "half_duplex" if args.half_duplex else "hands_free"
    options = CallOptions(
        url=args.url,
        mode=mode,
        token=args.api_key or args.client_secret,
        texts=tuple(args.text),
        instructions=args.instructions,
        hang_up_when_done=args.wav is not None or bool(args.text),
        half_duplex_tail_ms=args.tail_ms,
        reconnect_window_s=args.reconnect_window,
    )
    call = Call(options, source, sink, emit)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, call.stop)
    if args.ptt:
        loop.add_reader(sys.stdin.fileno(), _key, call, loop)
    try:
        return await call.run()
    finally:
        if args.ptt:
            loop.remove_reader(sys.stdin.fileno())
        source.close()
        sink.close()


def _key(call, loop: asyncio.AbstractEventLoop) -> None:
    """One line on stdin (Enter) toggles push-to-talk; end of input stops reading."""
    if sys.stdin.readline():
        call.toggle_talk()
    else:
        loop.remove_reader(sys.stdin.fileno())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="glm4voice call",
        description="Call a GLM-4-Voice server from the terminal: microphone and speaker, or WAV files.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from client.report import JsonReport, TextReport

    emit = JsonReport() if args.json else TextReport()
    try:
        code, message = asyncio.run(_run(args, emit))
    except CallError as exc:  # the audio devices, before the call started
        code, message = exc.code, str(exc)
    if args.json:
        emit({"type": "client.exit", "code": int(code), "message": message})
    if code != ExitCode.OK:
        print(f"glm4voice call: {message}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())

"""The `glm4voice` console script: `serve`, `call URL`, `demo-weights DIR`, `download`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the WebRTC voice server")
    p.add_argument("--host", help="listen address (config [http].host)")
    p.add_argument("--port", type=int, help="TCP port (config [http].port)")
    p.add_argument("--config", type=Path, help="config file (default: ./config.toml when it exists)")
    p.add_argument("--responder", choices=["glm4voice", "echo"], help="config [responder].kind")
    p.add_argument(
        "--require-weights",
        action="store_true",
        default=None,
        help="refuse to start on demo weights (config [model].require_weights)",
    )
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto (config [model].device)")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (config [model].dtype)")
    p.add_argument(
        "--int4", action="store_true", default=None, help="load the LM in 4 bit (bitsandbytes NF4)"
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", choices=["text", "json"], help="config [logging].format")


async def _serve(config) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully: refuse new calls, tell every client, give
    replies in progress `[http] shutdown_grace_s`, close the calls, stop the engine. A second signal
    skips the rest of the grace period."""
    import signal

    from server.app import SERVER_KEY, create_app
    from server.edge.connections import start_site

    log = logging.getLogger("glm4voice")
    app = create_app(config)
    runner, _ = await start_site(app, config, config.http.host, config.http.port)
    log.info(
        "serving on http://%s:%d/ (responder: %s)", config.http.host, config.http.port, config.responder.kind
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    drain: asyncio.Task | None = None

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set() and drain is not None:
            log.warning("%s again: closing calls now", sig.name)
            drain.cancel()
        else:
            log.info("%s: shutting down (grace %.1f s)", sig.name, config.http.shutdown_grace_s)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
        drain = loop.create_task(app[SERVER_KEY].drain(config.http.shutdown_grace_s))
        try:
            await drain
        except asyncio.CancelledError:
            if not drain.cancelled():
                raise
    finally:
        await runner.cleanup()  # closes whatever is left, stops the engine
    log.info("shut down")


def serve(args: argparse.Namespace) -> int:
    from server.config import load_config
    from server.logs import setup_logging

    config_path = args.config
    if config_path is None and (Path.cwd() / "config.toml").is_file():
        config_path = Path.cwd() / "config.toml"
    overrides = {
        "http": {"host": args.host, "port": args.port},
        "responder": {"kind": args.responder},
        "logging": {"format": args.log_format},
        "model": {
            "require_weights": args.require_weights,
            "device": args.device,
            "dtype": args.dtype,
            "quantization": "int4" if args.int4 else None,
        },
    }
    try:
        config = load_config(config_path, overrides=overrides)
    except ValueError as exc:
        print(f"glm4voice: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, config.logging.format)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(config))
    else:
        uvloop.run(_serve(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("demo-weights", "download"):
        # The engine's tools take their own flags; import them only when asked (they import torch).
        if argv[0] == "demo-weights":
            from pipeline.weights.demo import main as tool
        else:
            from pipeline.weights.download import main as tool
        return int(tool(argv[1:]) or 0)
    parser = argparse.ArgumentParser(
        prog="glm4voice", description="Real-time WebRTC voice server for GLM-4-Voice"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    from client.cli import add_arguments as call_arguments  # torch-free, argparse only until run

    call_arguments(sub.add_parser("call", help="call a server from the terminal (client/, docs/client.md)"))
    sub.add_parser("demo-weights", help="write tiny random demo weights to DIR (pipeline.weights.demo)")
    sub.add_parser("download", help="download the official checkpoints (pipeline.weights.download)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "call":
        from client.cli import run as call

        return call(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

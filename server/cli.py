"""The `glm4voice` console script: `serve`, `demo-weights DIR`, `download`."""

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
    p.add_argument("--require-weights", action="store_true", default=None,
                   help="refuse to start on demo weights (config [model].require_weights)")
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto (config [model].device)")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (config [model].dtype)")
    p.add_argument("--int4", action="store_true", default=None, help="load the LM in 4 bit (bitsandbytes NF4)")
    p.add_argument("--log-level", default="INFO")


async def _serve(config) -> None:
    from aiohttp import web

    from server.app import create_app

    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, config.http.host, config.http.port)
    await site.start()
    logging.getLogger("glm4voice").info("serving on http://%s:%d/ (responder: %s)", config.http.host,
                                        config.http.port, config.responder.kind)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(args: argparse.Namespace) -> int:
    from server.config import load_config

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config_path = args.config
    if config_path is None and (Path.cwd() / "config.toml").is_file():
        config_path = Path.cwd() / "config.toml"
    overrides = {
        "http": {"host": args.host, "port": args.port},
        "responder": {"kind": args.responder},
        "model": {"require_weights": args.require_weights, "device": args.device, "dtype": args.dtype,
                  "quantization": "int4" if args.int4 else None},
    }
    try:
        config = load_config(config_path, overrides=overrides)
    except ValueError as exc:
        print(f"glm4voice: {exc}", file=sys.stderr)
        return 2
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
            from pipeline.demo_weights import main as tool
        else:
            from pipeline.download import main as tool
        return int(tool(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="glm4voice", description="Real-time WebRTC voice server for GLM-4-Voice")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    sub.add_parser("demo-weights", help="write tiny random demo weights to DIR (pipeline.demo_weights)")
    sub.add_parser("download", help="download the official checkpoints (pipeline.download)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

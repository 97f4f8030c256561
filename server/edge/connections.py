"""TCP connections to the HTTP server: caps per client address and in total, a header deadline, and the
file-descriptor budget they need.

- Header deadline: aiohttp closes a connection that has not sent a complete request head within its
  `keepalive_timeout` (armed at connect, re-armed after each response); we set it to
  `[http] header_timeout_s`. Body reads are bounded by `[http] body_timeout_s` (server/edge/limits.py).
- Caps: aiohttp has none. `ConnectionLimits.install()` wraps the aiohttp server's connection hooks (its
  internals, in this one place): a connection over `max_connections_per_address` gets `429
  too_many_connections`, over `max_connections` `503 server_busy`, written at once and closed, so
  half-open sockets from one client cannot use up the descriptors that `/health` and calls need.
- File descriptors: every connection and every call's ICE/DTLS sockets is one or more descriptors;
  `check_fd_limit()` raises the soft RLIMIT_NOFILE to what the caps need when the hard limit allows,
  and says so in the log when it does not.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from server.config import Config
from server.edge.errors import quiet_library_logs
from server.logs import LogLimiter

log = logging.getLogger("glm4voice.connections")
FDS_PER_CALL = 6  # aiortc: one UDP socket per host candidate and family, the STUN/TURN ones, slack
FDS_RESERVED = 64  # logs, the engine's files, the event loop's own, the listening socket


def _refusal(status: int, reason: str, code: str, message: str, retry_after_s: int) -> bytes:
    body = json.dumps(
        {
            "error": {
                "type": "server_error" if status >= 500 else "invalid_request_error",
                "code": code,
                "message": message,
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after_s}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionLimits:
    def __init__(self, max_total: int, max_per_address: int, retry_after_s: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.retry_after_s = retry_after_s
        self.per_address: Counter[str] = Counter()
        self._address: dict[RequestHandler, str] = {}
        self.refused = 0
        self._refusal_lines = LogLimiter()

    @property
    def total(self) -> int:
        return len(self._address)

    def install(self, server: web.Server) -> None:
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._admit(handler, transport)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            address = self._address.pop(handler, None)
            if address is not None:
                self.per_address[address] -= 1
                if self.per_address[address] <= 0:
                    del self.per_address[address]
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _admit(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else "unknown"
        if self.per_address[address] >= self.max_per_address:
            refusal = _refusal(
                429,
                "Too Many Requests",
                "too_many_connections",
                f"more than {self.max_per_address} open connections from {address}",
                self.retry_after_s,
            )
        elif self.total >= self.max_total:
            refusal = _refusal(
                503,
                "Service Unavailable",
                "server_busy",
                f"the server is at its limit of {self.max_total} open connections",
                self.retry_after_s,
            )
        else:
            self._address[handler] = address
            self.per_address[address] += 1
            return
        self.refused += 1
        allow, _ = self._refusal_lines.allow()
        if allow:
            log.warning(
                "connection from %s refused (%d so far; one line per %g s): per address %d/%d, total %d/%d",
                address,
                self.refused,
                self._refusal_lines.interval_s,
                self.per_address[address],
                self.max_per_address,
                self.total,
                self.max_total,
            )
        transport.write(refusal)
        # Closed now: the request head may be on its way, and a socket closed with unread input resets
        # the connection (the client could lose the refusal). aiohttp starts the handler's request
        # loop after this hook, and that loop needs the handler still connected (else an assertion
        # and a traceback per refusal): the loop is told to read nothing, the transport's close goes to
        # a stand-in protocol, and the handler is released once its loop has started.
        handler._force_close = True
        transport.set_protocol(asyncio.Protocol())
        transport.close()
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, handler.connection_lost, None)


def fds_needed(config: Config) -> int:
    return config.http.max_connections + config.limits.max_calls * FDS_PER_CALL + FDS_RESERVED


def check_fd_limit(config: Config) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to what the caps need if the hard limit allows; else warn.
    Returns (soft limit now, needed)."""
    needed = fds_needed(config)
    try:
        import resource
    except ImportError:  # not POSIX: nothing to check
        return needed, needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("raised the open-file limit from %d to %d (the caps need %d)", soft, target, needed)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the open-file limit is %d but max_connections=%d and max_calls=%d need about %d: raise it "
            "(ulimit -n, LimitNOFILE=) or lower the caps",
            soft,
            config.http.max_connections,
            config.limits.max_calls,
            needed,
        )
    return soft, needed


async def start_site(
    app: web.Application, config: Config, host: str, port: int
) -> tuple[web.AppRunner, web.TCPSite]:
    """Run `app` on host:port with the connection caps installed. -> (runner, site)."""
    quiet_library_logs()
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    http = config.http
    ConnectionLimits(
        http.max_connections, http.max_connections_per_address, config.limits.retry_after_s
    ).install(runner.server)
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site

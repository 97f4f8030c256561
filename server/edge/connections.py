"""TCP connections to the HTTP server: caps per client address and in total, a header deadline, and the
file-descriptor budget they need.

- Header deadline: aiohttp closes a connection that has not sent a complete request head within its
  `keepalive_timeout` (armed at connect, re-armed after each response); we set it to
  `[http] header_timeout_s`. Body reads are bounded by `[http] body_timeout_s` (server/edge/limits.py).
- Caps: aiohttp has none. A `Gate` protocol sees each new connection before aiohttp does (`GatedSite`:
  aiohttp's TCP site started with our protocol factory, its internals in this one place). A connection
  over `max_connections_per_address` gets `429 too_many_connections`, over `max_connections` `503
  server_busy`, written at once and closed, so half-open sockets from one client cannot use up the
  descriptors that `/health` and calls need. A refused connection never reaches aiohttp (no request
  handler, no task): one write and a close.
- Blocked addresses (server/edge/penalties.py): a connection from an address in the penalty box gets
  `429 rate_limited` with `Retry-After` the same way, when the TCP peer is the client (`[http]
  trust_forwarded_for` off; behind proxies the penalty middleware refuses per request). A refusal over
  the caps is not a strike: it ends when the client's own connections close.
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
from server.edge.errors import QuietAccessLog, quiet_library_logs
from server.edge.penalties import PENALTIES_KEY, Penalties
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
    """Who may open a connection: the caps, and blocked addresses. Installed as a gate in front of aiohttp
    (`GatedSite`): a refused connection never reaches aiohttp, so it costs one write and a close."""

    def __init__(
        self,
        max_total: int,
        max_per_address: int,
        retry_after_s: int,
        penalties: Penalties,
        peer_is_client: bool,
    ) -> None:
        self.penalties = penalties
        self.peer_is_client = peer_is_client  # no trusted proxy in front: the TCP peer is the client
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
        """Count the admitted connections out as aiohttp releases them."""
        lost = server.connection_lost

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            address = self._address.pop(handler, None)
            if address is not None:
                self.per_address[address] -= 1
                if self.per_address[address] <= 0:
                    del self.per_address[address]
            lost(handler, exc)

        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def admit(self, handler: RequestHandler, address: str) -> None:
        self._address[handler] = address
        self.per_address[address] += 1

    def refusal(self, address: str) -> bytes | None:
        """The bytes that refuse a new connection from `address`, or None if it may come in."""
        blocked_s = self.penalties.blocked_s(address) if self.peer_is_client else 0.0
        if blocked_s > 0:
            error = self.penalties.refusal(address, blocked_s)
            return _refusal(
                429, "Too Many Requests", error.code, error.message, self.penalties.retry_after_s(blocked_s)
            )
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
            return None
        self._log_refusal(address)
        return refusal

    def _log_refusal(self, address: str) -> None:
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


class Gate(asyncio.Protocol):
    """A new connection's first protocol: refuses it (the refusal written, then closed) or hands the
    transport to a fresh aiohttp request handler. No bytes are read before the hand-over."""

    def __init__(self, limits: ConnectionLimits, server: web.Server) -> None:
        self.limits = limits
        self.server = server

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else "unknown"
        refusal = self.limits.refusal(address)
        if refusal is not None:
            transport.write(refusal)
            transport.close()  # after the write is flushed
            return
        handler = self.server()
        self.limits.admit(handler, address)
        transport.set_protocol(handler)
        handler.connection_made(transport)


class GatedSite(web.TCPSite):
    """aiohttp's TCP site with the `Gate` in front of its request handlers (its `start`, with our factory)."""

    def __init__(self, runner: web.AppRunner, limits: ConnectionLimits, host: str, port: int) -> None:
        super().__init__(runner, host, port)
        self.limits = limits

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: Gate(self.limits, server), self._host, self._port, reuse_address=self._reuse_address
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]


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
    runner = web.AppRunner(app, handle_signals=False, access_log_class=QuietAccessLog)
    await runner.setup()
    assert runner.server is not None
    http = config.http
    limits = ConnectionLimits(
        http.max_connections,
        http.max_connections_per_address,
        config.limits.retry_after_s,
        app[PENALTIES_KEY],
        peer_is_client=not http.trust_forwarded_for,
    )
    limits.install(runner.server)
    site = GatedSite(runner, limits, host, port)
    await site.start()
    return runner, site

"""The penalty box: a client address that keeps getting refused waits out a penalty, refused as cheaply as
the server can refuse anything.

Why: a refused request still costs the event loop a request's work (accept, parse, route, auth, answer),
about half a millisecond each here, so a few thousand wrong keys or over-rate requests a second from one
address take the loop from every call. A blocked address costs one written 429 per connection instead.

- Strikes: each refusal that says "stop" (`401`, `403`, `429`; weights in `STRIKES`) and each call
  ended for abuse (`ABUSE_ENDINGS`) adds to the address's strikes; they drain at
  `[limits] penalty_decay_per_s`. Reaching `penalty_strikes` blocks the address for `penalty_s`, doubled
  for each new block within `MEMORY_S` of the last one, up to `penalty_max_s`.
- While blocked: a new TCP connection from it is answered `429 rate_limited` with `Retry-After` at
  accept, before its request is read (server/edge/connections.py; only when the TCP peer is the client,
  i.e. `[http] trust_forwarded_for` off), and any request from it (a kept-alive connection, or the client
  behind our proxies) gets the same answer first thing, with `Connection: close`. Calls already running
  are not touched: the penalty is on new requests.
- Bounded: at most `MAX_ADDRESSES` records; past it, records with nothing left to remember go first.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from server.config import HttpConfig, LimitsConfig
from server.edge.limits import ApiError, client_address
from server.logs import LogLimiter
from server.metrics import Metrics

log = logging.getLogger("glm4voice.penalties")

STRIKES = {401: 1.0, 403: 1.0, 429: 1.0}  # by HTTP status of a refusal
ABUSE_ENDINGS = {"inbound_flood": 20.0, "too_many_channels": 20.0}  # a call ended for abuse, by reason
MEMORY_S = 600.0  # a new block within this long of the last one is twice as long
MAX_ADDRESSES = 50_000


@dataclass
class Record:
    strikes: float = 0.0
    t_s: float = 0.0  # when `strikes` was last brought up to date
    blocked_until_s: float = 0.0
    block_s: float = 0.0  # the last block's length (0: never blocked)

    def drain(self, now_s: float, per_s: float) -> None:
        self.strikes = max(0.0, self.strikes - (now_s - self.t_s) * per_s)
        self.t_s = now_s

    def forgettable(self, now_s: float, per_s: float) -> bool:
        self.drain(now_s, per_s)
        return self.strikes <= 0.0 and now_s >= self.blocked_until_s + MEMORY_S


class Penalties:
    def __init__(self, limits: LimitsConfig, metrics: Metrics) -> None:
        self.metrics = metrics
        self.threshold = limits.penalty_strikes
        self.decay_per_s = limits.penalty_decay_per_s
        self.first_s = limits.penalty_s
        self.max_s = limits.penalty_max_s
        self._records: dict[str, Record] = {}
        self._lines = LogLimiter()

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def blocked_s(self, address: str, now_s: float | None = None) -> float:
        """Seconds the address stays blocked (0: not blocked)."""
        record = self._records.get(address)
        if record is None:
            return 0.0
        now_s = time.monotonic() if now_s is None else now_s
        return max(0.0, record.blocked_until_s - now_s)

    def strike(self, address: str, weight: float, why: str, now_s: float | None = None) -> None:
        if not self.enabled or weight <= 0:
            return
        now_s = time.monotonic() if now_s is None else now_s
        record = self._records.get(address)
        if record is None:
            self._make_room(now_s)
            record = self._records[address] = Record(t_s=now_s)
        if now_s < record.blocked_until_s:
            return  # refusals while blocked are answered at the door and add nothing
        record.drain(now_s, self.decay_per_s)
        record.strikes += weight
        if record.strikes >= self.threshold:
            self._block(address, record, why, now_s)

    @staticmethod
    def retry_after_s(left_s: float) -> int:
        return max(1, math.ceil(left_s))

    def refusal(self, address: str, left_s: float) -> ApiError:
        self.metrics.blocked_refusals.inc()
        retry = self.retry_after_s(left_s)
        return ApiError(
            429,
            "rate_limited",
            f"too many refused requests from {address}: blocked for {retry} s more",
            headers={"Retry-After": str(retry)},
        )

    def _block(self, address: str, record: Record, why: str, now_s: float) -> None:
        recent = record.block_s > 0 and now_s - record.blocked_until_s < MEMORY_S
        record.block_s = min(self.max_s, 2 * record.block_s if recent else self.first_s)
        record.blocked_until_s = now_s + record.block_s
        record.strikes = self.threshold / 2  # a repeat offender is back soon after the block ends
        self.metrics.address_blocks.inc()
        allow, suppressed = self._lines.allow()
        if allow:
            log.warning(
                "address %s blocked for %g s after repeated refusals (last: %s)%s",
                address[:64],
                record.block_s,
                why,
                f"; {suppressed} more blocks not logged" if suppressed else "",
            )

    def _make_room(self, now_s: float) -> None:
        if len(self._records) < MAX_ADDRESSES:
            return
        for address in [a for a, r in self._records.items() if r.forgettable(now_s, self.decay_per_s)]:
            del self._records[address]
        if len(self._records) >= MAX_ADDRESSES:  # all of them remembered: the least blocked go
            keep = sorted(self._records.items(), key=lambda item: item[1].blocked_until_s)
            self._records = dict(keep[len(keep) // 2 :])


PENALTIES_KEY: web.AppKey[Penalties] = web.AppKey("penalties", Penalties)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_penalty_middleware(penalties: Penalties, http: HttpConfig):
    """Outermost: a blocked address is refused before anything else runs; a refusal (the response the
    inner middlewares rendered) strikes its address."""

    @web.middleware
    async def penalty_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not penalties.enabled:
            return await handler(request)
        address = client_address(request, http.trust_forwarded_for, http.trusted_proxy_hops)
        left_s = penalties.blocked_s(address)
        if left_s > 0:
            response = penalties.refusal(address, left_s).response()
            response.force_close()  # its next request comes on a new connection, refused at accept
            return response
        response = await handler(request)
        weight = STRIKES.get(response.status, 0.0)
        if weight:
            penalties.strike(address, weight, f"{response.status} on {request.method} {request.path[:64]}")
        return response

    return penalty_middleware

"""Resume after a network drop: a dropped call's conversation, parked for `limits.resume_window_s`.

A WebRTC call that ends because the network went (peer connection failed or closed by the peer without
a hangup, or nothing heard for `peer_timeout_s`) does not close its responder session: the session -
history and KV cache in the engine - is parked here under the call's resume token, which the client
got in `session.created`. A new offer presenting the token (body field `resume_token`, or the header
`X-GLM4Voice-Resume-Token`) takes the session back, so the next turn's prompt extends the cached
history instead of prefilling it again. A parked session holds a KV slot until it is resumed or its
window ends; then it is closed like a hung-up call. Parked calls have caps of their own, apart from
live calls: `max_parked_calls` in all and `max_parked_per_address` per client address (parking past
either closes the oldest parked call, of that address first); and they yield to live calls: a new
call that finds every slot held by live and parked calls closes the oldest parked one. So callers that
vanished never lock out new ones. Tokens are single-use: the
resumed call's `session.created` carries a new one. Tokens are secrets: kept only as hashes, never
logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.responder import ResponderSession
from server.logs import call_tag
from server.realtime.conversation import Conversation

if TYPE_CHECKING:
    from server.call.settings import CallSettings

log = logging.getLogger("glm4voice.resume")
RESUME_HEADER = "X-GLM4Voice-Resume-Token"
SPENT_MEMORY = 4_096  # hashes of expired / used tokens remembered, to say why a resume failed


def new_resume_token() -> str:
    return f"rsm_{secrets.token_urlsafe(24)}"


def _key(token: str) -> str:
    """Lookups by hash: the table never holds a usable token, and a probe learns nothing from timing."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@dataclass
class ParkedCall:
    """What a dropped call leaves for its resumption."""

    session: ResponderSession
    conversation: Conversation
    settings: CallSettings
    call_id: str  # the dropped call's (its tag names it in log lines)
    address: str = ""  # the client address that made the call (the per-address cap)
    expiry: asyncio.TimerHandle | None = None


class ParkedCalls:
    """Parked sessions by token hash; each one's window is a loop timer (no sweeping)."""

    def __init__(self, window_s: float, max_total: int = 0, max_per_address: int = 0) -> None:
        """`max_total`, `max_per_address`: the caps (0: none)."""
        self.window_s = window_s
        self.max_total = max_total
        self.max_per_address = max_per_address
        self._parked: dict[str, ParkedCall] = {}
        self._spent: OrderedDict[str, str] = OrderedDict()  # token hash -> why it no longer resumes
        self._closing: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, token: str, parked: ParkedCall) -> None:
        same = [k for k, p in self._parked.items() if p.address == parked.address]  # oldest first
        if self.max_per_address and len(same) >= self.max_per_address:
            self._evict(same[0], f"its address has {self.max_per_address} parked calls")
        if self.max_total and len(self._parked) >= self.max_total:
            self._evict(next(iter(self._parked)), f"{self.max_total} calls are parked")
        key = _key(token)
        parked.expiry = asyncio.get_running_loop().call_later(self.window_s, self._expire, key)
        self._parked[key] = parked
        log.info("call %s parked for %g s (resume window)", call_tag(parked.call_id), self.window_s)

    def peek(self, token: str) -> ParkedCall | None:
        """The parked call for `token`, left parked (a resume is checked in full before it takes it)."""
        return self._parked.get(_key(token))

    async def make_room(self, keep: str | None) -> bool:
        """A live call needs the place of a parked one: the oldest (not `keep`'s, a token being resumed)
        is closed, its engine session before this returns. -> whether one was."""
        keep_key = _key(keep) if keep is not None else None
        key = next((k for k in self._parked if k != keep_key), None)
        if key is None:
            return False
        parked = self._pop(key, "evicted")
        log.info("call %s: closed to make room for a new call", call_tag(parked.call_id))
        await self._close_session(parked)
        return True

    def _evict(self, key: str, why: str) -> None:
        parked = self._pop(key, "evicted")
        log.info("call %s: closed, %s", call_tag(parked.call_id), why)
        self._close(parked)

    def _pop(self, key: str, reason: str) -> ParkedCall:
        parked = self._parked.pop(key)
        if parked.expiry is not None:
            parked.expiry.cancel()
        self._remember(key, reason)
        return parked

    def holds(self, token: str) -> bool:
        return _key(token) in self._parked

    def take(self, token: str) -> ParkedCall | str:
        """The parked call for `token`, now no longer parked; or why there is none:
        "expired", "already_resumed" or "unknown"."""
        key = _key(token)
        parked = self._parked.pop(key, None)
        if parked is None:
            return self._spent.get(key, "unknown")
        if parked.expiry is not None:
            parked.expiry.cancel()
        self._remember(key, "already_resumed")
        return parked

    def discard_call(self, call_id: str) -> bool:
        """A hangup of a dropped call (its client gave up rather than resume): its slot is free now."""
        key = next((k for k, p in self._parked.items() if p.call_id == call_id), None)
        if key is None:
            return False
        parked = self._parked.pop(key)
        if parked.expiry is not None:
            parked.expiry.cancel()
        self._remember(key, "expired")
        self._close(parked)
        return True

    def _expire(self, key: str) -> None:
        parked = self._parked.pop(key, None)
        if parked is None:
            return
        self._remember(key, "expired")
        log.info("call %s: resume window ended, conversation closed", call_tag(parked.call_id))
        self._close(parked)

    def _remember(self, key: str, reason: str) -> None:
        self._spent[key] = reason
        self._spent.move_to_end(key)
        while len(self._spent) > SPENT_MEMORY:
            self._spent.popitem(last=False)

    def _close(self, parked: ParkedCall) -> None:
        task = asyncio.get_running_loop().create_task(self._close_session(parked), name="close-parked")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_session(parked: ParkedCall) -> None:
        try:
            await parked.session.close()
        except Exception:
            log.exception("call %s: closing the parked session failed", call_tag(parked.call_id))

    async def close_all(self) -> None:
        """Shutdown, or the responder failed: no parked conversation can be resumed."""
        parked, self._parked = list(self._parked.values()), {}
        for p in parked:
            if p.expiry is not None:
                p.expiry.cancel()
        await asyncio.gather(
            *(self._close_session(p) for p in parked), *self._closing, return_exceptions=True
        )

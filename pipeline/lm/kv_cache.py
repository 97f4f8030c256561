"""Static KV pool shared by all calls, and the per-call `LMCache` handle (one slot of the pool).

gpt-fast style: preallocated buffers written by position, so the decode step has fixed shapes. One pool
serves every call; a decode step batches calls of different lengths by slot index and per-row position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading ids two sequences share: a cache holding `a` keeps this much of `b` (the rest is
    prefilled)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ContextFullError(ValueError):
    """The tokens would pass the model's context (config `seq_length`); drop old turns and re-prefill."""


class PoolFullError(RuntimeError):
    """Every KV slot is held by a call: the pool is fixed at start (`[model] max_calls`), it never grows."""


class KVPool:
    """Per layer, K and V buffers of shape (slots + 1, kv_groups, max_tokens, head_dim), allocated once.

    `slots` caches are handed out to calls; the last slot is scratch, never handed out: padded rows of a
    decode step (batch padded to a graph bucket) write there. No growth: growing copies every buffer while
    calls wait and invalidates captured graphs, so the engine reserves one slot per admitted call at start.
    KV written past a cache's length is stale and never read: attention masks by position.
    """

    def __init__(
        self,
        num_layers: int,
        kv_groups: int,
        head_dim: int,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        slots: int = 1,
    ) -> None:
        self.num_layers, self.kv_groups, self.head_dim = num_layers, kv_groups, head_dim
        self.max_tokens = max_tokens  # per slot: min(context_tokens, the model's seq_length)
        self.device, self.dtype = device, dtype
        shape = (slots + 1, kv_groups, max_tokens, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self._free = list(range(slots - 1, -1, -1))  # lowest slot first: busy slots stay packed

    @property
    def capacity(self) -> int:
        """Slots calls can hold (the scratch slot excluded)."""
        return self.k[0].shape[0] - 1

    @property
    def scratch_slot(self) -> int:
        return self.capacity

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    @property
    def bytes_per_slot(self) -> int:
        return slot_bytes(
            self.num_layers, self.kv_groups, self.head_dim, self.max_tokens, self.k[0].element_size()
        )

    def acquire(self) -> int:
        if not self._free:
            raise PoolFullError(
                f"all {self.capacity} KV slots are held by calls: raise [model] max_calls "
                f"(each slot holds {self.bytes_per_slot / 2**20:.0f} MiB) or admit fewer calls"
            )
        self._free.sort(reverse=True)
        return self._free.pop()

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.capacity:
            raise ValueError(f"KV slot {slot} is not in use")
        self._free.append(slot)


def slot_bytes(num_layers: int, kv_groups: int, head_dim: int, tokens: int, element_size: int) -> int:
    """K and V of one call at `tokens` context: 2 x layers x groups x tokens x head_dim elements."""
    return 2 * num_layers * kv_groups * tokens * head_dim * element_size


@dataclass
class LMCache:
    """One call's KV cache: the slot it owns and the token ids whose K/V the slot holds, in order."""

    pool: KVPool
    slot: int
    token_ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    def truncate(self, n_tokens: int) -> None:
        """Keep the first `n_tokens` (barge-in rollback, a re-tokenised turn); O(1), nothing is copied."""
        if not 0 <= n_tokens <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-token cache to {n_tokens}")
        del self.token_ids[n_tokens:]

    def reset(self) -> None:
        self.token_ids.clear()

    def release(self) -> None:
        """Give the slot back to the pool (also done when the cache is garbage-collected)."""
        if self.slot >= 0:
            self.pool.release(self.slot)
            self.slot = -1
        self.token_ids.clear()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: the pool may already be gone
            pass

"""The penalty box's arithmetic (server/edge/penalties.py), on an explicit clock."""

from __future__ import annotations

import pytest

from server.config import LimitsConfig
from server.edge import penalties as box
from server.edge.penalties import Penalties
from server.metrics import Metrics


def _box(**limits) -> tuple[Penalties, Metrics]:
    metrics = Metrics()
    return Penalties(LimitsConfig(**limits), metrics), metrics


def test_a_steady_trickle_under_the_decay_never_blocks() -> None:
    p, metrics = _box(penalty_strikes=10, penalty_decay_per_s=1.0)
    for i in range(1000):  # one refusal a second for 1000 s
        p.strike("10.0.0.1", 1.0, "401", now_s=float(i))
        assert p.blocked_s("10.0.0.1", now_s=float(i)) == 0
    assert metrics.value("glm4voice_address_blocks_total") == 0


def test_a_burst_blocks_for_penalty_s_and_only_that_address() -> None:
    p, metrics = _box(penalty_strikes=10, penalty_s=5.0, penalty_max_s=60.0)
    for _ in range(9):
        p.strike("10.0.0.1", 1.0, "401", now_s=100.0)
    assert p.blocked_s("10.0.0.1", now_s=100.0) == 0
    p.strike("10.0.0.1", 1.0, "401", now_s=100.0)
    assert p.blocked_s("10.0.0.1", now_s=100.0) == pytest.approx(5.0)
    assert p.blocked_s("10.0.0.1", now_s=103.0) == pytest.approx(2.0)
    assert p.blocked_s("10.0.0.1", now_s=105.0) == 0
    assert p.blocked_s("10.0.0.2", now_s=100.0) == 0
    assert metrics.value("glm4voice_address_blocks_total") == 1


def test_strikes_while_blocked_add_nothing() -> None:
    p, _ = _box(penalty_strikes=4, penalty_s=5.0, penalty_decay_per_s=0.0)
    for _ in range(4):
        p.strike("a", 1.0, "429", now_s=0.0)
    for t in range(1, 5):
        p.strike("a", 100.0, "429", now_s=float(t))
    assert p.blocked_s("a", now_s=4.9) == pytest.approx(0.1)


def test_repeat_blocks_double_up_to_the_max_and_are_forgotten_later() -> None:
    p, metrics = _box(penalty_strikes=4, penalty_s=5.0, penalty_max_s=12.0, penalty_decay_per_s=1.0)
    lengths = []
    now = 0.0
    for _ in range(4):
        while p.blocked_s("a", now_s=now) == 0:
            p.strike("a", 1.0, "401", now_s=now)
        lengths.append(p.blocked_s("a", now_s=now))
        now += lengths[-1]  # the block ends; the client goes on at once
    assert lengths == pytest.approx([5.0, 10.0, 12.0, 12.0])
    assert metrics.value("glm4voice_address_blocks_total") == 4
    now += box.MEMORY_S + 1  # long after: a new block is a first one again
    while p.blocked_s("a", now_s=now) == 0:
        p.strike("a", 1.0, "401", now_s=now)
    assert p.blocked_s("a", now_s=now) == pytest.approx(5.0)


def test_zero_strikes_turns_the_box_off() -> None:
    p, _ = _box(penalty_strikes=0)
    for _ in range(10_000):
        p.strike("a", 20.0, "call ended: inbound_flood", now_s=0.0)
    assert not p.enabled and p.blocked_s("a", now_s=0.0) == 0


def test_the_table_of_addresses_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(box, "MAX_ADDRESSES", 100)
    p, _ = _box(penalty_strikes=2, penalty_decay_per_s=0.0)
    for i in range(1000):
        p.strike(f"10.0.{i // 256}.{i % 256}", 2.0, "401", now_s=float(i))  # each blocked at once
        assert len(p._records) <= 100
    assert p.blocked_s("10.0.3.231", now_s=999.0) > 0  # the newest is kept


def test_the_refusal_says_how_long() -> None:
    p, metrics = _box()
    error = p.refusal("10.0.0.1", 3.2)
    assert (error.status, error.code, error.headers["Retry-After"]) == (429, "rate_limited", "4")
    assert "10.0.0.1" in error.message and metrics.value("glm4voice_blocked_refusals_total") == 1

"""Observing the engine at rest from a test: every reply done, every early prefill made."""

from __future__ import annotations

import asyncio
import concurrent.futures

from pipeline.engine.commands import Wake
from pipeline.engine.thread import EngineThread


def _at_rest(sched) -> bool:
    return not any(
        d.reply is not None or d.early_prefill_wanted or sched.source.prefilling(d) for d in sched.dialogues
    )


async def settled(engine: EngineThread, timeout_s: float = 60.0) -> None:
    """Wait until the engine's LM thread, after one of its steps, has nothing left to compute: the test
    wraps that thread's `step` (it runs there, between steps, so it reads a consistent state) and wakes the
    thread in case it sleeps. Commands sent before this call are applied before that step."""
    sched = engine.scheduler
    done: concurrent.futures.Future = concurrent.futures.Future()
    step = sched.step

    def step_then_check() -> None:
        step()
        if not done.done() and _at_rest(sched):
            done.set_result(None)

    sched.step = step_then_check
    try:
        engine.send(Wake())
        await asyncio.wait_for(asyncio.wrap_future(done), timeout_s)
    finally:
        del sched.step  # the class's own step again

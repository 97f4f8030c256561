"""Decoder blocks of several replies at once: the decoder worker's one entry point.

`decode_blocks(jobs)` returns, for each job, exactly the PCM that decoding it alone would return
(`stream.push(tokens)`, then `stream.finish()` when `finish`), in job order. All jobs' streams share one
`SpeechDecoder`; a stream appears at most once per call. The jobs' blocks run as one batch
(`pipeline.decoder.stream.run_blocks`): the flow encoder row by row, then the length regulator, the Euler
loop and HiFT each as one right-padded batch with the rows' lengths (docs/decoder.md, "Batched blocks"). A
job whose push completes several blocks runs them in successive rounds; the tail flush rides with the
other rows through the vocoder.

Failure contract: a job whose decoding raises gets the exception in its slot instead of PCM; the other
jobs' results are unaffected. The batch works on copies of the streams' states and writes them back only
after the whole batch has succeeded; when it raises, every stream's draws are rewound and each job is
decoded alone, so a failing job fails only itself.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.decoder.stream import BlockStep, DecoderStream, StreamState, run_blocks

log = logging.getLogger(__name__)

# Jobs per batch. A batch ends when its longest row ends, so the most urgent reply (the worker orders the
# jobs by urgency) waits for every row in its batch; the estimator runs two rows per job (guidance), and
# CUDA graphs are recorded per batch size up to this bound (pipeline/decoder/graphs.py). 8 covers the
# ready blocks of a GPU's concurrent calls at the 80-token block cap (6.4 s of audio per block) without
# holding the first one up by more than one batch.
MAX_BATCH = 8
# Device types where jobs whose blocks differ in size pad into one batch. A GPU runs a block in about the same
# time whatever its frame count (launch-bound, docs/decoder.md "Figures"), so padding is nearly free there; a
# CPU is compute-bound and pays for every padded frame (measured slower than one by one, docs/decoder.md
# "Batched blocks"), so there only jobs whose first blocks have the same frame count share a batch.
PADDED_DEVICES = frozenset({"cuda"})


@dataclass(frozen=True)
class BlockJob:
    """One reply's next block: the speech values to push and whether generation has ended."""

    stream: DecoderStream
    tokens: list[int]  # speech values (may be empty when only the tail is left)
    finish: bool  # generation ended: flush the stream's tail after the tokens


@dataclass
class _Planned:
    index: int  # the job's slot in the results
    job: BlockJob
    steps: list[BlockStep]  # the blocks push/finish would decode, in order
    pending: list[int]  # tokens left pending after them


def decode_one(job: BlockJob) -> np.ndarray:
    """One job alone: (samples,) float32 at the decoder's rate, possibly empty."""
    parts = [np.zeros(0, dtype=np.float32)]
    if job.tokens:
        parts.append(job.stream.push(job.tokens))
    if job.finish:
        parts.append(job.stream.finish())
    return np.concatenate(parts).astype(np.float32, copy=False)


def _decode_or_error(job: BlockJob) -> np.ndarray | Exception:
    try:
        return decode_one(job)
    except Exception as exc:  # isolated to this job's reply; the caller reports it
        return exc


def decode_blocks(jobs: Sequence[BlockJob]) -> list[np.ndarray | Exception]:
    """Each job's PCM (or the exception its decoding raised), in job order (see the module docstring)."""
    if len({id(j.stream) for j in jobs}) != len(jobs):
        raise ValueError("decode_blocks: a stream appears in more than one job")
    if len({id(j.stream.decoder) for j in jobs}) > 1:
        raise ValueError("decode_blocks: the jobs' streams use different decoders")
    results: list[np.ndarray | Exception] = [np.zeros(0, dtype=np.float32)] * len(jobs)
    planned = []
    for i, job in enumerate(jobs):
        try:
            steps, pending = job.stream.plan(job.tokens, job.finish)
        except Exception as exc:  # bad tokens, push after finish: what push would raise
            results[i] = exc
            continue
        planned.append(_Planned(i, job, steps, pending))
    idle = [p for p in planned if not p.steps]  # tokens buffered, nothing to decode yet
    for chunk in [idle] + _batches([p for p in planned if p.steps]):
        try:
            pcm: list[np.ndarray | Exception] = list(_decode_batch(chunk))
        except Exception:  # noqa: BLE001 - find the failing job: each alone, from the rewound state
            log.warning(
                "decoder batch of %d jobs failed; decoding them one by one", len(chunk), exc_info=True
            )
            pcm = [_decode_or_error(p.job) for p in chunk]
        for p, out in zip(chunk, pcm, strict=True):
            results[p.index] = out
    return results


def _batches(busy: list[_Planned]) -> list[list[_Planned]]:
    """The jobs in batches of at most MAX_BATCH, in job order (the first job's batch first); on devices
    outside PADDED_DEVICES one batch per frame count of the jobs' first blocks."""
    groups: dict[int, list[_Planned]] = {}
    for p in busy:
        pads = p.job.stream.decoder.device.type in PADDED_DEVICES
        groups.setdefault(0 if pads else p.job.stream.estimator_frames(p.steps[0]), []).append(p)
    return [g[k : k + MAX_BATCH] for g in groups.values() for k in range(0, len(g), MAX_BATCH)]


def _copy(state: StreamState) -> StreamState:
    """A working copy the batch may move on: the blocks replace the state's tensors, never write into them."""
    cache = dataclasses.replace(state.flow_cache, encoder=dataclasses.replace(state.flow_cache.encoder))
    return dataclasses.replace(
        state, prompt_tokens=list(state.prompt_tokens), pending=list(state.pending), flow_cache=cache
    )


def _decode_batch(chunk: list[_Planned]) -> list[np.ndarray]:
    """Every planned job's blocks, as one batch per round; the streams change only if all succeed."""
    if not chunk:
        return []
    decoder = chunk[0].job.stream.decoder
    snapshots = [p.job.stream.draws.snapshot() for p in chunk]
    work = [_copy(p.job.stream.state) for p in chunk]
    parts: list[list[np.ndarray]] = [[np.zeros(0, dtype=np.float32)] for _ in chunk]
    try:
        for r in range(max(len(p.steps) for p in chunk)):
            live = [k for k, p in enumerate(chunk) if r < len(p.steps)]
            outs = run_blocks(decoder, [(chunk[k].job.stream, work[k], chunk[k].steps[r]) for k in live])
            for k, out in zip(live, outs, strict=True):
                parts[k].append(out.audio)
    except BaseException:
        for p, snapshot in zip(chunk, snapshots, strict=True):
            p.job.stream.draws.restore(snapshot)
        raise
    for p, state in zip(chunk, work, strict=True):
        state.pending = p.pending
        if p.job.finish:
            state.pending, state.finished = [], True
        target = p.job.stream.state
        for f in dataclasses.fields(StreamState):
            setattr(target, f.name, getattr(state, f.name))
    return [np.concatenate(ps).astype(np.float32, copy=False) for ps in parts]

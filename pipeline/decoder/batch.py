"""Decoder blocks of several replies at once: the decoder worker's one entry point.

`decode_blocks(jobs)` returns, for each job, exactly the PCM that decoding it alone would return
(`stream.push(tokens)`, then `stream.finish()` when `finish`), in job order. All jobs' streams share one
`SpeechDecoder`; a stream appears at most once per call. This first version decodes the jobs one after
another; the batched path (one padded batch through the flow encoder, the Euler loop and HiFT) keeps
this signature and this contract.

Failure contract: a job whose decoding raises gets the exception in its slot instead of PCM; the other
jobs' results are unaffected (the batched path falls back to decoding the jobs alone when the batch
raises, so it must not change any stream's state before the whole batch has succeeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.decoder.stream import DecoderStream


@dataclass(frozen=True)
class BlockJob:
    """One reply's next block: the speech values to push and whether generation has ended."""

    stream: DecoderStream
    tokens: list[int]  # speech values (may be empty when only the tail is left)
    finish: bool  # generation ended: flush the stream's tail after the tokens


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
    return [_decode_or_error(job) for job in jobs]

"""Per-turn streaming state of the speech tokenizer (see pipeline/tokenizer/tokenizer.py for the
semantics)."""

from __future__ import annotations

import numpy as np

from pipeline.tokenizer.log_mel import DYNAMIC_RANGE
from pipeline.tokenizer.tokenizer import SegmentState, SpeechTokenizer, as_mono_float32


class TokenizerStream:
    """One user turn, pushed as 16 kHz audio of any chunk size.

    push() returns the tokens of each 4 s block (`quantize_causal_block_size` frames) as soon as its audio
    is complete; at a 30 s segment boundary the segment's exact tokens are known and the rest of it is
    returned. flush() ends the turn: afterwards `tokens` equals `tokenize()` of all pushed audio, and
    `first_changed` is the index of the first token that push() returned with a value the exact
    computation changed (None if none). Call reset() to start another turn.
    """

    def __init__(self, tokenizer: SpeechTokenizer, refresh: bool = True) -> None:
        self._tok = tokenizer
        self.refresh = refresh  # re-encode earlier blocks at push when the floor so far changes them
        self._seg: SegmentState = tokenizer.new_segment()
        self._emitted: list[int] = []  # every token returned so far, in order
        self._closed: list[int] = []  # exact tokens of finished 30 s segments
        self._final: list[int] | None = None
        self._samples_closed = 0  # samples of finished 30 s segments
        self.first_changed: int | None = None
        self.blocks_encoded_push = 0  # encoder block calls made by push() / flush() (cache statistics)
        self.blocks_encoded_flush = 0

    @property
    def tokens(self) -> list[int]:
        """After flush(): the turn's exact tokens. Before: the tokens returned so far."""
        return list(self._final if self._final is not None else self._emitted)

    def reset(self) -> None:
        """Start another turn. The encoder's key/value buffers go too (245 MB per call at the real sizes in
        float32): a call holds them only while its user is speaking; the next turn's first block allocates
        them again (the device's caching allocator hands the same memory back)."""
        self._seg.reset()
        self._seg.kv = None
        self._emitted, self._closed, self._final, self.first_changed = [], [], None, None
        self._samples_closed = 0
        self.blocks_encoded_push = self.blocks_encoded_flush = 0

    def push(self, wav16k: np.ndarray) -> list[int]:
        """Append audio (float32 mono 16 kHz; int16 accepted); returns the tokens that became final."""
        if self._final is not None:
            raise RuntimeError("TokenizerStream.push() after flush(): call reset() to start a new turn")
        wav = as_mono_float32(
            wav16k,
            self._tok.config.mel.sample_rate_hz,
            self._tok.config.mel.sample_rate_hz,
            allow_resample=False,
        )
        seg, seg_len, start = self._seg, self._tok.config.mel.segment_samples, len(self._emitted)
        pos, before = 0, seg.blocks_encoded
        while pos < len(wav):
            take = min(len(wav) - pos, seg_len - seg.n_samples)
            seg.audio[seg.n_samples : seg.n_samples + take] = wav[pos : pos + take]
            seg.n_samples += take
            pos += take
            self._emitted += self._advance(seg)
            if seg.n_samples == seg_len:  # the segment's floor is now exact: settle it
                self._settle(self._closed + self._tok.finish_segment(seg), returned=start)
                self._closed = list(self._emitted)
                self._samples_closed += seg_len
                seg.reset()
        self.blocks_encoded_push += seg.blocks_encoded - before
        return self._emitted[start:]

    def flush(self) -> list[int]:
        """End of turn: exact tokens for the open segment; returns the tokens not returned before."""
        if self._final is not None:
            return []
        start, before = len(self._emitted), self._seg.blocks_encoded
        self._settle(self._closed + self._tok.finish_segment(self._seg), returned=start)
        self.blocks_encoded_flush += self._seg.blocks_encoded - before
        self._final = list(self._emitted)
        return self._emitted[start:]

    def _settle(self, exact: list[int], returned: int) -> None:
        """Replace the tokens so far by `exact` (at least as long), noting the first changed one among
        the `returned` tokens the caller has already seen."""
        changed = next(
            (i for i, (a, b) in enumerate(zip(self._emitted[:returned], exact, strict=False)) if a != b), None
        )
        if changed is not None and (self.first_changed is None or changed < self.first_changed):
            self.first_changed = changed
        self._emitted = list(exact)

    def _advance(self, seg: SegmentState) -> list[int]:
        """Stream step: encode every block whose audio is now complete; returns their tokens.

        The floor is the max so far - 8. With `self.refresh`, earlier blocks whose inputs that floor changes
        are re-encoded first (not returned again), so the new block sees the same context `tokenize()` of the
        audio so far would, and flush() has less to redo; without it, the new block attends to the stale
        cache.
        """
        tok = self._tok
        c, out = tok.config, []
        while True:
            last_frame = c.block_mel_frames * (seg.n_chunks + 1) - 2
            if tok.log_mel.last_sample_needed(last_frame) > seg.n_samples:
                return out
            tok.compute_chunk(seg, c.mel.segment_samples, last_frame + 1)
            floor = seg.raw[:, : last_frame + 1].max() - DYNAMIC_RANGE  # the floor known so far
            all_valid = c.block_frames * seg.n_chunks
            if self.refresh:
                seg.truncate_blocks(tok.exact_blocks(seg, floor.item()))
                while len(seg.block_tokens) < seg.n_chunks - 1:
                    tok.encode_next_block(seg, floor, last_frame + 1, all_valid)
            out += tok.encode_next_block(seg, floor, last_frame + 1, all_valid)

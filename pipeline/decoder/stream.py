"""Streaming decode of one reply: the official `token2wav` state machine (docs/decoder.md, streaming
semantics).

Each block is conditioned on every earlier token and mel of the reply (prompt tokens + prompt mel). Its new
mel's first 34 frames are cross-faded with the previous block's held-back 34 frames (Hamming(68) halves,
computed in float64 as the official numpy window); the previous seam's last mel frame is prepended and its
last 256 source samples overwrite the new source start; unless finalising, the last 34 frames are held back,
the rest vocoded, the last 256 samples held back (they are re-made by the next block). `legacy_prompt=True`
feeds back the vocoder input *with* the prepended seam frame, as the official demo does (docs/decoder.md; the
fix, https://github.com/zai-org/GLM-4-Voice/pull/86, is unmerged) -- the prompt mel then drifts one frame from
the tokens; the default feeds back the frames without it.

Bounded cost per block (docs/decoder.md): under the official semantics every block re-runs the
estimator over the whole reply, so a block's cost grows with the reply and a reply's cost quadratically.
The defaults bound it: blocks grow 10, 20, 40, 80 tokens and stay at 80 (the official demo grows its
blocks too: 25, 50, 100, 150, 200), and the estimator sees at most the last 50 prompt tokens' frames.
`schedule=(25, 50, 100, 150, 200), max_prompt_tokens=None` is the official computation (docs/decoder.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.decoder.config import DecoderConfig
from pipeline.decoder.draws import Draws, OfficialDraws, SeededDraws
from pipeline.decoder.flow import FlowCache, FlowRow, FlowTrace
from pipeline.decoder.model import SpeechDecoder, VocodeRow

# 10 first: the paper's "as few as 10 audio tokens" (first audio); then doubling while the stream gets
# ahead of playback, as the official demo grows its blocks; capped at 80 tokens (6.4 s of audio) so one
# block's work -- and the LM steps it holds up on the engine thread -- stays bounded.
DEFAULT_SCHEDULE = (10, 20, 40, 80)
# The estimator sees the last 50 tokens (4 s, 344 frames) of the reply as prompt: with 80-token blocks a
# block integrates at most 344 + frames(80) + the 34 re-made cross-fade frames = 930 frames, whatever the
# reply's length (the encoder and length regulator still see the whole reply; they are cheap).
DEFAULT_MAX_PROMPT_TOKENS = 50


@dataclass(frozen=True)
class StreamSettings:
    schedule: tuple[int, ...]  # tokens per block; the last entry repeats
    legacy_prompt: bool  # official demo's prompt mel with duplicated seam frames
    cache_encoder: bool  # reuse complete 10-token blocks' encodings (output equal up to rounding)
    max_prompt_frames: int | None  # bound on the prompt frames the estimator sees (None = official)

    @classmethod
    def build(
        cls,
        schedule: tuple[int, ...],
        legacy_prompt: bool,
        cache_encoder: bool,
        max_prompt_tokens: int | None,
        cfg: DecoderConfig,
    ) -> StreamSettings:
        schedule = tuple(int(n) for n in schedule)
        # A non-final first block must give more mel frames than the 34 it holds back.
        smallest = next(n for n in range(1, 1000) if cfg.flow.frames_for(n) > cfg.mel_overlap_frames)
        if not schedule or min(schedule) < smallest:
            raise ValueError(f"decoder schedule {schedule}: every block needs at least {smallest} tokens")
        frames = None
        if max_prompt_tokens is not None:
            if max_prompt_tokens < 1:
                raise ValueError(f"max_prompt_tokens {max_prompt_tokens}: must be positive or None")
            frames = cfg.flow.frames_for(max_prompt_tokens)
        return cls(schedule, bool(legacy_prompt), bool(cache_encoder), frames)


@dataclass
class StreamState:
    """Everything one reply carries between blocks."""

    prompt_tokens: list[int] = field(default_factory=list)  # every token already decoded
    prompt_mel: torch.Tensor | None = None  # (1, 80, P) fed-back mel, float32
    mel_overlap: torch.Tensor | None = None  # (1, 80, 34) held-back frames, float32
    cache_mel: torch.Tensor | None = None  # (1, 80, 1) last vocoded frame
    cache_source: torch.Tensor | None = None  # (1, 1, 256) last source samples
    pending: list[int] = field(default_factory=list)  # pushed tokens not yet decoded
    blocks_done: int = 0
    finished: bool = False
    flow_cache: FlowCache = field(default_factory=FlowCache)

    def reset(self) -> None:
        self.prompt_tokens, self.pending = [], []
        self.prompt_mel = self.mel_overlap = self.cache_mel = self.cache_source = None
        self.blocks_done, self.finished = 0, False
        self.flow_cache.reset()


@dataclass(frozen=True)
class BlockStep:
    """One block of a stream: its tokens (None: only the held-back tail is left to vocode) and whether
    it ends the reply."""

    tokens: list[int] | None
    finalize: bool


@dataclass
class BlockOutput:
    audio: np.ndarray  # float32 samples that became final
    mel: torch.Tensor  # (1, 80, frames) the official `tts_mel` (vocoder input)
    flow_mel: torch.Tensor | None  # (1, 80, frames) flow output before the cross-fade
    trace: dict[str, torch.Tensor] = field(default_factory=dict)  # intermediates, when asked


class DecoderStream:
    """A reply's stream. `schedule`: tokens per block, the last repeating (the current official demo
    uses (25, 50, 100, 150, 200), the original (10, 20)). `legacy_prompt`: feed back the official
    demo's prompt mel with its duplicated seam frame. `seed`: None = the official seed-42 recipe per
    block; an int = a stream generator seeded once. `draws` overrides both (tests inject here).
    `cache_encoder`: reuse the encodings of complete 10-token blocks (same output up to float
    rounding). `max_prompt_tokens`: bound on the prompt the estimator sees (changes the output;
    None = the official unbounded prompt)."""

    def __init__(
        self,
        decoder: SpeechDecoder,
        schedule: tuple[int, ...] = DEFAULT_SCHEDULE,
        legacy_prompt: bool = False,
        seed: int | None = None,
        draws: Draws | None = None,
        cache_encoder: bool = True,
        max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
    ) -> None:
        if draws is None:
            sines, bins = decoder.cfg.hift.nb_harmonics + 1, decoder.cfg.flow.mel_bins
            draws = (
                OfficialDraws(decoder.device, bins, sines)
                if seed is None
                else SeededDraws(decoder.device, seed, bins)
            )
        self.decoder, self.draws = decoder, draws
        self.settings = StreamSettings.build(
            schedule, legacy_prompt, cache_encoder, max_prompt_tokens, decoder.cfg
        )
        self.state = StreamState()
        cfg = decoder.cfg
        window = np.hamming(2 * cfg.mel_overlap_frames)  # float64, as the official numpy window
        self._fade = torch.from_numpy(window).to(decoder.device)

    @property
    def tokens_decoded(self) -> int:
        return len(self.state.prompt_tokens)

    @property
    def tokens_to_next_block(self) -> int:
        """Speech tokens `push` still needs before it decodes the next block (the schedule's next size
        minus what is pending): the engine can buffer tokens until it has this many."""
        return max(0, self._block_size() - len(self.state.pending))

    def reset(self) -> None:
        self.state.reset()

    def _block_size(self) -> int:
        sched = self.settings.schedule
        return sched[min(self.state.blocks_done, len(sched) - 1)]

    def plan(self, tokens: list[int], finish: bool) -> tuple[list[BlockStep], list[int]]:
        """The blocks that `push(tokens)` (then `finish()` when `finish`) would decode, in order, and the
        tokens left pending after them, without decoding anything or changing the stream
        (pipeline/decoder/batch.py runs them for many streams; the same errors as `push`)."""
        st = self.state
        if st.finished and tokens:
            raise RuntimeError("DecoderStream.push after finish(); call reset() for a new reply")
        pending, steps = st.pending + self.decoder.check_tokens(tokens), []
        sched = self.settings.schedule
        while len(pending) >= (size := sched[min(st.blocks_done + len(steps), len(sched) - 1)]):
            steps.append(BlockStep(pending[:size], finalize=False))
            pending = pending[size:]
        if finish and not st.finished:
            if pending:
                steps.append(BlockStep(pending, finalize=True))
            elif steps or st.mel_overlap is not None:
                steps.append(BlockStep(None, finalize=True))  # vocode the held-back frames
            pending = []
        return steps, pending

    def estimator_frames(self, step: BlockStep) -> int:
        """Frames the Euler loop integrates for this stream's next block `step` (0 for the tail flush)."""
        if step.tokens is None:
            return 0
        st, cfg = self.state, self.decoder.cfg
        frames = cfg.flow.frames_for(len(st.prompt_tokens) + len(step.tokens))
        prompt = 0 if st.prompt_mel is None else st.prompt_mel.shape[-1]
        limit = self.settings.max_prompt_frames
        return frames - prompt + (prompt if limit is None else min(prompt, limit))

    def push(self, tokens: list[int]) -> np.ndarray:
        """Add speech tokens; returns the audio that became final (possibly empty). A block is decoded
        as soon as it is complete (the official loop waits for one more token)."""
        if self.state.finished:
            raise RuntimeError("DecoderStream.push after finish(); call reset() for a new reply")
        self.state.pending += self.decoder.check_tokens(tokens)
        parts = [np.zeros(0, dtype=np.float32)]
        while len(self.state.pending) >= self._block_size():
            size = self._block_size()
            block, self.state.pending = self.state.pending[:size], self.state.pending[size:]
            parts.append(self.decode_block(block, finalize=False).audio)
        return np.concatenate(parts)

    def finish(self) -> np.ndarray:
        """End of the reply: decode the pending tokens as a finalising block, or, when none are pending,
        vocode the held-back frames (the official loop would have finalised the last block itself)."""
        if self.state.finished:
            return np.zeros(0, dtype=np.float32)
        if self.state.pending:
            out = self.decode_block(self.state.pending, finalize=True).audio
        elif self.state.mel_overlap is not None:
            out = run_blocks(self.decoder, [(self, self.state, BlockStep(None, finalize=True))])[0].audio
        else:
            out = np.zeros(0, dtype=np.float32)
        self.state.pending, self.state.finished = [], True
        return out

    def decode_block(self, tokens: list[int], finalize: bool, trace: bool = False) -> BlockOutput:
        """One official `token2wav` call on `tokens` with the reply so far as prompt."""
        tokens = self.decoder.check_tokens(tokens)
        if not tokens:
            raise ValueError("decoder block is empty: give at least one speech token")
        if self.state.finished:
            raise RuntimeError("DecoderStream already finished; call reset() for a new reply")
        (out,) = run_blocks(self.decoder, [(self, self.state, BlockStep(tokens, finalize))], trace)
        return out

    # ---- one block in three parts around the model calls (run_blocks batches those across streams)
    def flow_row(self, st: StreamState, step: BlockStep) -> FlowRow | None:
        """Start the block: its draws begin; the flow's inputs (None for the tail flush)."""
        self.draws.begin_block()
        if step.tokens is None:
            return None
        dec, all_tokens = self.decoder, st.prompt_tokens + step.tokens
        noise = self.draws.flow_noise(dec.cfg.flow.frames_for(len(all_tokens)))  # (1, 80, F) incl. prompt
        prompt_mel = st.prompt_mel if st.prompt_mel is not None else noise[:, :, :0]
        return FlowRow(
            torch.tensor(all_tokens, dtype=torch.long).to(dec.device),
            prompt_mel.to(device=dec.device, dtype=dec.dtype),
            noise.to(dec.device),
            st.flow_cache if self.settings.cache_encoder else None,
            self.settings.max_prompt_frames,
        )

    def vocode_row(
        self, st: StreamState, step: BlockStep, mel: torch.Tensor | None
    ) -> tuple[VocodeRow, torch.Tensor | None]:
        """Cross-fade, seam frame and hold-back of the flow's new mel (1, 80, F - P) -> the vocoder's
        inputs with this block's draws, and the block's fresh frames (its mel without the seam frame and
        the held-back ones). The tail flush vocodes the held-back frames."""
        cfg = self.decoder.cfg
        n = cfg.mel_overlap_frames
        if mel is None:
            return self._vocode_row(torch.cat([st.cache_mel, st.mel_overlap], dim=2), None), None
        mel = mel.float()
        if st.mel_overlap is not None:  # Hamming cross-fade, float64 as the official numpy window
            faded = mel[:, :, :n].double() * self._fade[:n] + st.mel_overlap.double() * self._fade[n:]
            mel[:, :, :n] = faded.float()
        fresh = mel if step.finalize else mel[:, :, :-n]  # this block's frames without the seam frame
        if st.cache_mel is not None:
            mel = torch.cat([st.cache_mel, mel], dim=2)  # (1, 80, 1 + frames)
        if not step.finalize:
            st.mel_overlap, mel = mel[:, :, -n:], mel[:, :, :-n]
        return self._vocode_row(mel, st.cache_source), fresh

    def _vocode_row(self, mel: torch.Tensor, cache_source: torch.Tensor | None) -> VocodeRow:
        dec = self.decoder
        sines = dec.cfg.hift.nb_harmonics + 1
        phase = self.draws.source_phase(sines)
        noise = self.draws.source_noise(sines, mel.shape[-1] * dec.cfg.hift.samples_per_frame)
        return VocodeRow(mel, phase, noise, cache_source)

    def end_block(
        self,
        st: StreamState,
        step: BlockStep,
        row: VocodeRow,
        fresh: torch.Tensor | None,
        audio: torch.Tensor,
        source: torch.Tensor,
    ) -> np.ndarray:
        """The vocoder's audio (1, S) and source (1, 1, S) -> the block's final audio; the state moves on."""
        cfg = self.decoder.cfg
        if step.finalize:
            st.mel_overlap = st.cache_mel = st.cache_source = None
            st.finished = True
        else:
            st.cache_mel = row.mel[:, :, -cfg.mel_cache_frames :]
            st.cache_source = source[:, :, -cfg.source_cache_samples :]
            audio = audio[:, : -cfg.source_cache_samples]  # re-made by the next block
        if step.tokens is not None:
            fed_back = row.mel if self.settings.legacy_prompt else fresh
            st.prompt_mel = fed_back if st.prompt_mel is None else torch.cat([st.prompt_mel, fed_back], dim=2)
            st.prompt_tokens = st.prompt_tokens + step.tokens
            st.blocks_done += 1
        return audio[0].float().cpu().numpy()  # the block's one device->host copy


@torch.inference_mode()
def run_blocks(
    decoder: SpeechDecoder, blocks: list[tuple[DecoderStream, StreamState, BlockStep]], trace: bool = False
) -> list[BlockOutput]:
    """One block of each stream, moving each given state: the flow of all of them as one batch, then the
    vocoder of all of them as one batch (the same path for one stream and for many). `trace` (one block):
    the intermediates the parity tests compare."""
    flow_trace = FlowTrace() if trace else None
    flow_rows = [stream.flow_row(st, step) for stream, st, step in blocks]
    mels = iter(decoder.flow_mels([r for r in flow_rows if r is not None], flow_trace))
    new_mels = [None if r is None else next(mels) for r in flow_rows]
    flow_mels = [None if m is None else m.clone() for m in new_mels] if trace else [None] * len(blocks)
    rows = [s.vocode_row(st, step, m) for (s, st, step), m in zip(blocks, new_mels, strict=True)]
    vocoded = decoder.vocode([row for row, _ in rows])
    outs = []
    for (stream, st, step), (row, fresh), (audio, source, f0), flow_mel in zip(
        blocks, rows, vocoded, flow_mels, strict=True
    ):
        out = BlockOutput(stream.end_block(st, step, row, fresh, audio, source), row.mel, flow_mel)
        if flow_trace is not None:
            out.trace = {
                "encoder_out": flow_trace.encoder_out,
                "encoder_proj_out": flow_trace.encoder_proj_out,
                "mu": flow_trace.mu,
                "f0": f0,
                "source": source,
            }
        outs.append(out)
    return outs


def synthesize(
    decoder: SpeechDecoder, tokens: list[int], draws: Draws | None = None, seed: int | None = None
) -> np.ndarray:
    """One finalising call over all tokens (`offline_inference`): float32 audio at 22.05 kHz."""
    stream = DecoderStream(decoder, draws=draws, seed=seed, cache_encoder=False)
    return stream.decode_block(tokens, finalize=True).audio

"""Streaming decode of one reply: the official `token2wav` state machine (REFERENCE.md §5.5).

Each block is conditioned on every earlier token and mel of the reply (prompt tokens + prompt mel). Its
new mel's first 34 frames are cross-faded with the previous block's held-back 34 frames (Hamming(68)
halves, computed in float64 as the official numpy window); the previous seam's last mel frame is
prepended and its last 256 source samples overwrite the new source start; unless finalising, the last 34
frames are held back, the rest vocoded, the last 256 samples held back (they are re-made by the next
block). `legacy_prompt=True` feeds back the vocoder input *with* the prepended seam frame, as the
official demo does (REFERENCE §5.5; PR #86 unmerged) -- the prompt mel then drifts one frame from the
tokens; the default feeds back the frames without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.flow import FlowCache, FlowTrace

if TYPE_CHECKING:
    from pipeline.decoder import DecoderConfig, Draws, SpeechDecoder


@dataclass(frozen=True)
class StreamSettings:
    schedule: tuple[int, ...]  # tokens per block; the last entry repeats
    legacy_prompt: bool  # official demo's prompt mel with duplicated seam frames
    cache_encoder: bool  # reuse complete 10-token blocks' encodings (output equal up to rounding)
    max_prompt_frames: int | None  # opt-in bound on the prompt the estimator sees (None = official)

    @classmethod
    def build(cls, schedule: tuple[int, ...], legacy_prompt: bool, cache_encoder: bool,
              max_prompt_tokens: int | None, cfg: DecoderConfig) -> StreamSettings:
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


@dataclass
class BlockOutput:
    audio: np.ndarray  # float32 samples that became final
    mel: torch.Tensor  # (1, 80, frames) the official `tts_mel` (vocoder input)
    flow_mel: torch.Tensor | None  # (1, 80, frames) flow output before the cross-fade
    trace: dict[str, torch.Tensor] = field(default_factory=dict)  # intermediates, when asked


class DecoderStream:
    def __init__(self, decoder: SpeechDecoder, settings: StreamSettings, draws: Draws):
        self.decoder, self.settings, self.draws = decoder, settings, draws
        self.state = StreamState()
        cfg = decoder.cfg
        window = np.hamming(2 * cfg.mel_overlap_frames)  # float64, as the official numpy window
        self._fade = torch.from_numpy(window).to(decoder.device)

    @property
    def tokens_decoded(self) -> int:
        return len(self.state.prompt_tokens)

    def reset(self) -> None:
        self.state.reset()

    def _block_size(self) -> int:
        sched = self.settings.schedule
        return sched[min(self.state.blocks_done, len(sched) - 1)]

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
        else:
            out = self._flush_tail()
        self.state.pending, self.state.finished = [], True
        return out

    @torch.inference_mode()
    def _flush_tail(self) -> np.ndarray:
        st = self.state
        if st.mel_overlap is None:
            return np.zeros(0, dtype=np.float32)
        self.draws.begin_block()
        audio, _, _ = self._vocode(torch.cat([st.cache_mel, st.mel_overlap], dim=2), None)
        st.mel_overlap = st.cache_mel = st.cache_source = None
        st.finished = True
        return audio[0].float().cpu().numpy()

    @torch.inference_mode()
    def decode_block(self, tokens: list[int], finalize: bool, trace: bool = False) -> BlockOutput:
        """One official `token2wav` call on `tokens` with the reply so far as prompt."""
        st = self.state
        tokens = self.decoder.check_tokens(tokens)
        if not tokens:
            raise ValueError("decoder block is empty: give at least one speech token")
        if st.finished:
            raise RuntimeError("DecoderStream already finished; call reset() for a new reply")
        self.draws.begin_block()
        flow_trace = FlowTrace() if trace else None
        mel = self._flow_mel(st.prompt_tokens + tokens, flow_trace)  # (1, 80, new frames) float32
        flow_mel = mel.clone() if trace else None
        audio, mel, fresh, vocoder_trace = self._seam_and_vocode(mel, finalize, trace)
        fed_back = mel if self.settings.legacy_prompt else fresh
        st.prompt_mel = fed_back if st.prompt_mel is None else torch.cat([st.prompt_mel, fed_back], dim=2)
        st.prompt_tokens = st.prompt_tokens + tokens
        st.blocks_done += 1
        out = BlockOutput(audio[0].float().cpu().numpy(), mel, flow_mel)  # the block's one device->host copy
        if flow_trace is not None:
            out.trace = {"encoder_out": flow_trace.encoder_out, "encoder_proj_out": flow_trace.encoder_proj_out,
                         "mu": flow_trace.mu, **vocoder_trace}
        return out

    def _flow_mel(self, all_tokens: list[int], trace: FlowTrace | None) -> torch.Tensor:
        """Flow over prompt + new tokens, conditioned on the fed-back mel -> new frames (1, 80, F - P)."""
        dec, st = self.decoder, self.state
        noise = self.draws.flow_noise(dec.cfg.flow.frames_for(len(all_tokens)))  # (1, 80, F) incl. prompt
        prompt_mel = st.prompt_mel if st.prompt_mel is not None else noise[:, :, :0]
        ids = torch.tensor(all_tokens, dtype=torch.long).to(dec.device)
        mel = dec.flow.inference(ids, prompt_mel.to(device=dec.device, dtype=dec.dtype), noise.to(dec.device),
                                 st.flow_cache if self.settings.cache_encoder else None, trace,
                                 self.settings.max_prompt_frames)
        return mel.float()

    def _seam_and_vocode(self, mel: torch.Tensor, finalize: bool, trace: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-fade, seam frame, hold-back and vocoder -> (audio (1, S), vocoder mel, fresh mel, trace)."""
        st, cfg = self.state, self.decoder.cfg
        n = cfg.mel_overlap_frames
        if st.mel_overlap is not None:  # Hamming cross-fade, float64 as the official numpy window
            faded = mel[:, :, :n].double() * self._fade[:n] + st.mel_overlap.double() * self._fade[n:]
            mel[:, :, :n] = faded.float()
        fresh = mel if finalize else mel[:, :, :-n]  # this block's frames without the seam frame
        if st.cache_mel is not None:
            mel = torch.cat([st.cache_mel, mel], dim=2)  # (1, 80, 1 + frames)
        if not finalize:
            st.mel_overlap, mel = mel[:, :, -n:], mel[:, :, :-n]
        audio, source, f0 = self._vocode(mel, st.cache_source)
        if finalize:
            st.mel_overlap = st.cache_mel = st.cache_source = None
            st.finished = True
        else:
            st.cache_mel = mel[:, :, -cfg.mel_cache_frames:]
            st.cache_source = source[:, :, -cfg.source_cache_samples:]
            audio = audio[:, :-cfg.source_cache_samples]  # re-made by the next block
        return audio, mel, fresh, ({"f0": f0, "source": source} if trace else {})

    def _vocode(self, mel: torch.Tensor, cache_source: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mel (1, 80, T) float32 -> (audio (1, 256T), source (1, 1, 256T), f0 (1, T)) with this block's draws."""
        dec = self.decoder
        sines = dec.cfg.hift.nb_harmonics + 1
        phase = self.draws.source_phase(sines)
        noise = self.draws.source_noise(sines, mel.shape[-1] * dec.cfg.hift.samples_per_frame)
        return dec.hift(mel.to(dec.dtype), phase, noise, cache_source)


def _first_block_batchable(streams: list[DecoderStream], token_lists: list[list[int]],
                           whole_first_block: bool = True) -> bool:
    """True when every stream is fresh (no prompt, nothing pending) on one decoder with one first-block
    size (and, with `whole_first_block`, each has at least that many tokens)."""
    if len(streams) < 2 or len(streams) != len(token_lists):
        return False
    first = streams[0]
    size = first.settings.schedule[0]
    for stream, tokens in zip(streams, token_lists, strict=True):
        st = stream.state
        if (stream.decoder is not first.decoder or stream.settings.schedule[0] != size or st.finished
                or st.blocks_done or st.pending or st.prompt_tokens or st.prompt_mel is not None
                or st.mel_overlap is not None or st.cache_mel is not None
                or (whole_first_block and len(tokens) < size)):
            return False
    return len({id(s) for s in streams}) == len(streams)


def push_first_blocks(streams: list[DecoderStream], token_lists: list[list[int]]) -> list[np.ndarray]:
    """`stream.push(tokens)` for each stream, with the streams' first blocks decoded as ONE batch when
    they all start a reply (`_first_block_batchable`); otherwise (or for the tokens after the first
    block) each stream is pushed on its own. Audio and stream state equal the one-by-one result up to
    float rounding: every stream draws its noise and phases from its own generator, in its own order."""
    token_lists = [streams[i].decoder.check_tokens(t) for i, t in enumerate(token_lists)]
    if not _first_block_batchable(streams, token_lists):
        return [s.push(t) for s, t in zip(streams, token_lists, strict=True)]
    size = streams[0].settings.schedule[0]
    firsts = decode_first_blocks(streams, [t[:size] for t in token_lists], finalize=False)
    return [np.concatenate([audio, s.push(t[size:])]) for audio, s, t in zip(firsts, streams, token_lists,
                                                                               strict=True)]


@torch.inference_mode()
def decode_first_blocks(streams: list[DecoderStream], token_lists: list[list[int]],
                        finalize: bool) -> list[np.ndarray]:
    """The first `decode_block` of several fresh streams as one batched forward (encoder per stream,
    then regulator, CFM estimator as a batch of 2B and HiFT batched). All blocks must have the same
    length; otherwise (or for streams that are not fresh) each stream decodes its block alone."""
    dec = streams[0].decoder
    cfg = dec.cfg
    n = cfg.mel_overlap_frames
    frames = cfg.flow.frames_for(len(token_lists[0])) if token_lists and token_lists[0] else 0
    if (len({len(t) for t in token_lists}) != 1 or not frames or (not finalize and frames <= n)
            or not _first_block_batchable(streams, token_lists, whole_first_block=False)):
        return [s.decode_block(t, finalize).audio for s, t in zip(streams, token_lists, strict=True)]
    vocoded = frames if finalize else frames - n
    sines = cfg.hift.nb_harmonics + 1
    noises, phases, sine_noises = [], [], []
    for stream in streams:  # each stream's draws in the order its own decode_block takes them
        stream.draws.begin_block()
        noises.append(stream.draws.flow_noise(frames).to(dec.device))
        phases.append(stream.draws.source_phase(sines).to(dec.device))
        sine_noises.append(stream.draws.source_noise(sines, vocoded * cfg.hift.samples_per_frame).to(dec.device))
    ids = [torch.tensor(dec.check_tokens(t), dtype=torch.long).to(dec.device) for t in token_lists]
    caches = [s.state.flow_cache if s.settings.cache_encoder else None for s in streams]
    mel = dec.flow.inference_first_blocks(ids, torch.cat(noises), caches).float()  # (B, 80, F)
    voc_mel = mel if finalize else mel[:, :, :-n]
    audio, source, _ = dec.hift(voc_mel.to(dec.dtype), torch.cat(phases), torch.cat(sine_noises), None)
    audio = audio.float().cpu().numpy()  # the batch's one device->host copy
    out = []
    for row, (stream, tokens) in enumerate(zip(streams, token_lists, strict=True)):
        st = stream.state
        fresh = voc_mel[row:row + 1].clone()  # no seam frame before a first block: vocoder mel == fresh
        if finalize:
            st.mel_overlap = st.cache_mel = st.cache_source = None
            st.finished = True
            out.append(audio[row])
        else:
            st.mel_overlap = mel[row:row + 1, :, -n:].clone()
            st.cache_mel = fresh[:, :, -cfg.mel_cache_frames:]
            st.cache_source = source[row:row + 1, :, -cfg.source_cache_samples:].clone()
            out.append(audio[row, :-cfg.source_cache_samples])
        st.prompt_mel = fresh
        st.prompt_tokens = list(tokens)
        st.blocks_done += 1
    return out

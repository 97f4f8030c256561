"""CUDA graphs of the decoder's launch-bound parts: the flow's Euler loop and the HiFT vocoder.

On a GPU a decoder block costs about the same whatever its size (docs/gpu.md): 10 Euler steps of the U-Net
estimator on a batch of two, then HiFT, are thousands of small kernels launched from Python. One graph per
exact input shape is recorded at warm-up (`prepare_graphs`, never while serving), for the shapes that the
stream settings give a reply's full blocks (`block_shapes`: with a bounded prompt window they repeat, a
handful in all). A shape without a graph runs eager: the finalising block (its length is free), blocks past
`reply_tokens`, other settings. Every input - the flow noise and the NSF phases and noise included - is
copied into the graph's static buffers, so each stream keeps its own draws (the official seed-42 recipe
holds); the outputs are copied out, since the next replay overwrites them. On the CPU the same
static-buffer path runs eagerly (`capture=False`): tests/unit/test_decoder_graphs.py proves it equals the
normal path; only the capture itself needs CUDA.

Batches of several replies' blocks (pipeline/decoder/batch.py) replay graphs recorded per (batch bucket, shape
bucket): a batch of B rows runs in the smallest recorded batch size >= B (unused rows are zeros at full
length), its rows right-padded to the smallest recorded frame count >= its longest row, every row's real
length an input of the graph (the masks of pipeline/decoder/padding.py are computed inside it). The frame
buckets are the full blocks' shapes, so finalising blocks and tail flushes of a batch fit one too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.decoder.model import SpeechDecoder
from pipeline.decoder.stream import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_SCHEDULE, StreamSettings

log = logging.getLogger(__name__)

REPLY_TOKENS = 1500  # shapes are enumerated for replies up to 2 minutes of speech (12.5 tokens/s)
BATCH_BUCKETS = (2, 4, 8)  # batch sizes recorded for batches of several replies, up to batch.MAX_BATCH


@dataclass(frozen=True)
class BlockShape:
    flow_frames: int  # frames the Euler loop integrates: prompt window + the block's new frames
    vocoder_frames: int  # mel frames HiFT vocodes
    seam: (
        bool  # HiFT overwrites its first source samples with the previous block's (every block but the first)
    )


def block_shapes(decoder: SpeechDecoder, settings: StreamSettings, reply_tokens: int) -> list[BlockShape]:
    """Shapes of the full (non-finalising) blocks of a reply of up to `reply_tokens` speech tokens, in order.
    The arithmetic of `DecoderStream.decode_block` (tests check it against a real stream)."""
    cfg, sched = decoder.cfg, settings.schedule
    hold = cfg.mel_overlap_frames
    tokens = prompt = 0  # tokens decoded, prompt mel frames fed back
    shapes: list[BlockShape] = []
    while tokens + sched[min(len(shapes), len(sched) - 1)] <= reply_tokens:
        tokens += sched[min(len(shapes), len(sched) - 1)]
        new = (
            cfg.flow.frames_for(tokens) - prompt
        )  # the block's frames, the 34 re-made cross-fade ones included
        window = prompt if settings.max_prompt_frames is None else min(prompt, settings.max_prompt_frames)
        vocoded = (
            new - hold + (cfg.mel_cache_frames if shapes else 0)
        )  # held back; previous seam frame prepended
        shapes.append(BlockShape(window + new, vocoded, bool(shapes)))
        prompt += vocoded if settings.legacy_prompt else new - hold
    return shapes


def _pad_to(x: torch.Tensor, rows: int, frames: int | None) -> torch.Tensor:
    """x (B, ..., T) -> (rows, ..., frames) with zeros after (frames None: keep T)."""
    out = x.new_zeros((rows, *x.shape[1:-1], x.shape[-1] if frames is None else frames))
    out[: x.shape[0], ..., : x.shape[-1]] = x
    return out


def _lengths_to(lengths: torch.Tensor | None, x: torch.Tensor, rows: int, frames: int) -> torch.Tensor:
    """The rows' real frames (lengths, or all of x's when None), then `frames` for each unused row."""
    real = lengths if lengths is not None else torch.full((x.shape[0],), x.shape[-1], device=x.device)
    return torch.cat([real, torch.full((rows - x.shape[0],), frames, device=x.device, dtype=real.dtype)])


def _signature(args: tuple[torch.Tensor | None, ...]) -> tuple:
    return tuple(None if x is None else (tuple(x.shape), x.dtype) for x in args)


class _Recorded:
    """One input signature of a function: static input buffers, the outputs computed from them and, once
    captured, the CUDA graph that recomputes them."""

    def __init__(
        self, fn: Callable[..., tuple[torch.Tensor, ...]], examples: tuple[torch.Tensor | None, ...]
    ):
        self.fn = fn
        self.inputs = tuple(None if x is None else torch.zeros_like(x) for x in examples)
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.graph: torch.cuda.CUDAGraph | None = None

    def capture(self, pool: tuple, stream: torch.cuda.Stream) -> None:
        self.fn(
            *self.inputs
        )  # eager first, on the capture stream: kernels chosen, workspaces and caches made
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            self.outputs = self.fn(*self.inputs)
        self.graph = graph

    def __call__(self, *args: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        for buf, x in zip(self.inputs, args, strict=True):
            if buf is not None:
                buf.copy_(x)
        if self.graph is None:
            self.outputs = self.fn(*self.inputs)  # the CPU proof: what the graph records, run eagerly
        else:
            self.graph.replay()
        return tuple(out.clone() for out in self.outputs)  # the next replay overwrites the static outputs


class DecoderGraphs:
    """The recorded shapes of one `SpeechDecoder` (set as `decoder.graphs`); `sample` and `vocode` replay
    a graph when one has the call's exact signature, else run eager."""

    def __init__(self, decoder: SpeechDecoder):
        self.decoder = decoder
        self._flow: dict[tuple, _Recorded] = {}
        self._vocoder: dict[tuple, _Recorded] = {}
        self._flow_batch: dict[tuple[int, int], _Recorded] = {}  # (batch, frames): padded rows with lengths
        self._vocoder_batch: dict[tuple[int, int], _Recorded] = {}
        self.captured = False
        self.replays = self.eager_runs = 0  # calls served by a recorded shape / by the plain modules

    def __len__(self) -> int:
        return len(self._flow) + len(self._vocoder) + len(self._flow_batch) + len(self._vocoder_batch)

    def add(self, shape: BlockShape) -> None:
        """Static buffers for one block shape (batch of one stream)."""
        dec = self.decoder
        bins, sines = dec.cfg.flow.mel_bins, dec.cfg.hift.nb_harmonics + 1
        mel = torch.zeros(1, bins, shape.flow_frames, device=dec.device, dtype=dec.dtype)
        flow_args = (mel, mel, mel)  # mu, cond, noise
        if _signature(flow_args) not in self._flow:
            self._flow[_signature(flow_args)] = _Recorded(lambda *a: (dec.flow.sample(*a),), flow_args)
        samples = shape.vocoder_frames * dec.cfg.hift.samples_per_frame
        f32 = {"device": dec.device, "dtype": torch.float32}
        vocoder_args = (
            torch.zeros(1, bins, shape.vocoder_frames, device=dec.device, dtype=dec.dtype),
            torch.zeros(1, sines, 1, **f32),
            torch.zeros(1, sines, samples, **f32),
            torch.zeros(1, 1, dec.cfg.source_cache_samples, **f32) if shape.seam else None,
        )
        if _signature(vocoder_args) not in self._vocoder:
            self._vocoder[_signature(vocoder_args)] = _Recorded(dec.hift, vocoder_args)

    def add_batch(self, batch: int, shape: BlockShape) -> None:
        """Static buffers for `batch` right-padded rows of up to this shape's frames, lengths as inputs."""
        dec = self.decoder
        bins, sines = dec.cfg.flow.mel_bins, dec.cfg.hift.nb_harmonics + 1
        f32 = {"device": dec.device, "dtype": torch.float32}
        lengths = torch.zeros(batch, device=dec.device, dtype=torch.long)
        if (batch, shape.flow_frames) not in self._flow_batch:
            mel = torch.zeros(batch, bins, shape.flow_frames, device=dec.device, dtype=dec.dtype)
            entry = _Recorded(lambda *a: (dec.flow.sample(*a),), (mel, mel, mel, lengths))
            entry.inputs[3].fill_(shape.flow_frames)  # full rows until a batch is copied in
            self._flow_batch[batch, shape.flow_frames] = entry
        if (batch, shape.vocoder_frames) not in self._vocoder_batch:
            samples = shape.vocoder_frames * dec.cfg.hift.samples_per_frame
            args = (
                torch.zeros(batch, bins, shape.vocoder_frames, device=dec.device, dtype=dec.dtype),
                torch.zeros(batch, sines, 1, **f32),
                torch.zeros(batch, sines, samples, **f32),
                torch.zeros(batch, 1, dec.cfg.source_cache_samples, **f32),
                lengths,
                torch.zeros(batch, 1, 1, device=dec.device, dtype=torch.bool),
            )
            entry = _Recorded(dec.hift, args)
            entry.inputs[4].fill_(shape.vocoder_frames)
            self._vocoder_batch[batch, shape.vocoder_frames] = entry

    def capture(self) -> None:
        """Record every shape now (CUDA, warm-up), largest first, in one memory pool shared by the graphs
        (they replay one at a time on the engine thread's stream)."""
        device = self.decoder.device
        pool, side = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for table in (self._flow, self._vocoder):
                for key in sorted(table, key=lambda k: -k[0][0][-1]):  # largest frame count first
                    table[key].capture(pool, side)
            for batched in (self._flow_batch, self._vocoder_batch):
                for key in sorted(batched, key=lambda k: (-k[0], -k[1])):  # largest first
                    batched[key].capture(pool, side)
        torch.cuda.current_stream(device).wait_stream(side)
        self.captured = True

    @staticmethod
    def _bucket(table: dict[tuple[int, int], _Recorded], batch: int, frames: int) -> _Recorded | None:
        """The smallest recorded (batch, frames) that holds `batch` rows of up to `frames` frames."""
        fits = [key for key in table if key[0] >= batch and key[1] >= frames]
        return table[min(fits)] if fits else None

    def sample(
        self, mu: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`FlowModel.sample`, replayed when its shape (one row) or its bucket (a batch) was recorded."""
        if mu.shape[0] > 1:
            entry = self._bucket(self._flow_batch, mu.shape[0], mu.shape[-1])
            if entry is not None:
                self.replays += 1
                frames = entry.inputs[0].shape[-1]
                padded = [_pad_to(x, entry.inputs[0].shape[0], frames) for x in (mu, cond, noise)]
                out = entry(*padded, _lengths_to(lengths, mu, entry.inputs[0].shape[0], frames))[0]
                return out[: mu.shape[0], :, : mu.shape[-1]]
        entry = self._flow.get(_signature((mu, cond, noise))) if lengths is None else None
        if entry is None:
            self.eager_runs += 1
            return self.decoder.flow.sample(mu, cond, noise, lengths)
        self.replays += 1
        return entry(mu, cond, noise)[0]

    def vocode(
        self,
        mel: torch.Tensor,
        phase: torch.Tensor,
        noise: torch.Tensor,
        cache_source: torch.Tensor | None,
        lengths: torch.Tensor | None = None,
        seam: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`HiftGenerator.forward` (audio, source, f0), replayed when its shape (one row) or its bucket (a
        batch) was recorded."""
        if cache_source is not None and cache_source.shape[-1] == 0:
            cache_source = None  # the module treats an empty seam as none
        if mel.shape[0] > 1:
            entry = self._bucket(self._vocoder_batch, mel.shape[0], mel.shape[-1])
            if entry is not None:
                return self._vocode_batch(entry, mel, phase, noise, cache_source, lengths, seam)
        entry = None
        if lengths is None and seam is None:
            entry = self._vocoder.get(_signature((mel, phase, noise, cache_source)))
        if entry is None:
            self.eager_runs += 1
            return self.decoder.hift(mel, phase, noise, cache_source, lengths, seam)
        self.replays += 1
        audio, source, f0 = entry(mel, phase, noise, cache_source)
        return audio, source, f0

    def _vocode_batch(
        self,
        entry: _Recorded,
        mel: torch.Tensor,
        phase: torch.Tensor,
        noise: torch.Tensor,
        cache_source: torch.Tensor | None,
        lengths: torch.Tensor | None,
        seam: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, frames = entry.inputs[0].shape[0], entry.inputs[0].shape[-1]
        b, t, spf = mel.shape[0], mel.shape[-1], self.decoder.cfg.hift.samples_per_frame
        n = entry.inputs[3].shape[-1]
        if cache_source is None:  # no row has a seam
            cache_source, seam = (
                torch.zeros(b, 1, n, device=mel.device),
                torch.zeros(b, 1, 1, dtype=torch.bool),
            )
        elif seam is None:  # every row has one
            seam = torch.ones(b, 1, 1, dtype=torch.bool, device=mel.device)
        self.replays += 1
        audio, source, f0 = entry(
            _pad_to(mel, rows, frames),
            _pad_to(phase, rows, None),
            _pad_to(noise, rows, frames * spf),
            _pad_to(cache_source, rows, None),
            _lengths_to(lengths, mel, rows, frames),
            _pad_to(seam, rows, None),
        )
        return audio[:b, : t * spf], source[:b, :, : t * spf], f0[:b, :t]


@torch.inference_mode()
def prepare_graphs(
    decoder: SpeechDecoder,
    schedule: tuple[int, ...] = DEFAULT_SCHEDULE,
    max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
    legacy_prompt: bool = False,
    reply_tokens: int = REPLY_TOKENS,
    capture: bool | None = None,
    batch_sizes: tuple[int, ...] = BATCH_BUCKETS,
) -> DecoderGraphs | None:
    """Static buffers (and, on CUDA, graphs) for the full blocks of streams with these settings (those of
    `DecoderStream`), one row and `batch_sizes` rows; sets and returns `decoder.graphs`. `capture=None`:
    capture on CUDA only. A failed capture leaves the decoder eager (`decoder.graphs = None`, logged once)."""
    settings = StreamSettings.build(schedule, legacy_prompt, True, max_prompt_tokens, decoder.cfg)
    if settings.max_prompt_frames is None:  # unbounded prompt: every block has a new, larger shape
        reply_tokens = min(reply_tokens, sum(settings.schedule))  # the growing blocks only
    capture = decoder.device.type == "cuda" if capture is None else capture
    graphs = DecoderGraphs(decoder)
    for shape in block_shapes(decoder, settings, reply_tokens):
        graphs.add(shape)
        for batch in batch_sizes:
            graphs.add_batch(batch, shape)
    t0 = time.monotonic()
    decoder.graphs = None
    if capture:
        try:
            graphs.capture()
        except Exception:  # noqa: BLE001 - serving goes on eager
            log.exception("decoder CUDA graph capture failed: decoder blocks run eager")
            return None
        log.info(
            "captured %d decoder CUDA graphs (schedule %s, prompt window %s tokens) in %.1f s",
            len(graphs),
            settings.schedule,
            max_prompt_tokens,
            time.monotonic() - t0,
        )
    decoder.graphs = graphs
    return graphs

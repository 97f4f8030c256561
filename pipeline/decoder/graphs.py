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
        self.captured = False
        self.replays = self.eager_runs = 0  # calls served by a recorded shape / by the plain modules

    def __len__(self) -> int:
        return len(self._flow) + len(self._vocoder)

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
        torch.cuda.current_stream(device).wait_stream(side)
        self.captured = True

    def sample(self, mu: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`FlowModel.sample`, replayed when its shape was recorded."""
        entry = self._flow.get(_signature((mu, cond, noise)))
        if entry is None:
            self.eager_runs += 1
            return self.decoder.flow.sample(mu, cond, noise)
        self.replays += 1
        return entry(mu, cond, noise)[0]

    def vocode(
        self, mel: torch.Tensor, phase: torch.Tensor, noise: torch.Tensor, cache_source: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`HiftGenerator.forward` (audio, source, f0), replayed when its shape was recorded."""
        if cache_source is not None and cache_source.shape[-1] == 0:
            cache_source = None  # the module treats an empty seam as none
        entry = self._vocoder.get(_signature((mel, phase, noise, cache_source)))
        if entry is None:
            self.eager_runs += 1
            return self.decoder.hift(mel, phase, noise, cache_source)
        self.replays += 1
        audio, source, f0 = entry(mel, phase, noise, cache_source)
        return audio, source, f0


@torch.inference_mode()
def prepare_graphs(
    decoder: SpeechDecoder,
    schedule: tuple[int, ...] = DEFAULT_SCHEDULE,
    max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
    legacy_prompt: bool = False,
    reply_tokens: int = REPLY_TOKENS,
    capture: bool | None = None,
) -> DecoderGraphs | None:
    """Static buffers (and, on CUDA, graphs) for the full blocks of streams with these settings (those of
    `DecoderStream`); sets and returns `decoder.graphs`. `capture=None`: capture on CUDA only. A failed
    capture leaves the decoder eager (`decoder.graphs = None`, logged once)."""
    settings = StreamSettings.build(schedule, legacy_prompt, True, max_prompt_tokens, decoder.cfg)
    if settings.max_prompt_frames is None:  # unbounded prompt: every block has a new, larger shape
        reply_tokens = min(reply_tokens, sum(settings.schedule))  # the growing blocks only
    capture = decoder.device.type == "cuda" if capture is None else capture
    graphs = DecoderGraphs(decoder)
    for shape in block_shapes(decoder, settings, reply_tokens):
        graphs.add(shape)
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

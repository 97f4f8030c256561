"""silero-vad through onnxruntime, torch-free: the ONNX file shipped inside the `silero-vad` pip package.

We locate the package's data folder without importing it (`import silero_vad` imports torch and sets
it to one thread). The model is shared by every call (an onnxruntime session is thread-safe for
`run`); each call owns a `VadState` (recurrent state + 64-sample context) with `reset()`.

Cost: one 32 ms chunk takes ~0.1-0.3 ms on one CPU core (bench/bench_call_path.py prints it), so it
runs inline on the event loop: ~1% of a core per call.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAMPLE_RATE_HZ = 16_000  # the model's input rate (the frame contract, pipeline/audio_format.py)
CHUNK_SAMPLES = 512  # silero-vad v5+ takes exactly 512 samples at 16 kHz (32 ms)
CONTEXT_SAMPLES = 64  # the tail of the previous chunk the model sees in front of each chunk (16 kHz)
STATE_SHAPE = (2, 1, 128)  # LSTM (h, c) x batch x units of the v5/v6 model
MODEL_FILE = "silero_vad.onnx"  # opset 16, the file silero_vad.load_silero_vad(onnx=True) loads


def bundled_model_path() -> Path:
    """The ONNX model inside the installed silero-vad package; never touches the network."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the silero-vad package is not installed (pip install silero-vad, without [audio])"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"silero-vad is installed but {path} is missing; reinstall silero-vad")
    return path


@dataclass
class VadState:
    """One call's VAD memory."""

    state: np.ndarray = field(default_factory=lambda: np.zeros(STATE_SHAPE, np.float32))  # (2, 1, 128)
    context: np.ndarray = field(default_factory=lambda: np.zeros((1, CONTEXT_SAMPLES), np.float32))  # (1, 64)

    def reset(self) -> None:
        self.state[:] = 0.0
        self.context[:] = 0.0


class SileroVad:
    """Shared model. `probability(state, chunk)` -> speech probability of one 512-sample chunk."""

    def __init__(self, path: Path | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = (
            1  # a 512-sample chunk gains nothing from threads; keep cores for the engine
        )
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.path = path or bundled_model_path()
        self._session = onnxruntime.InferenceSession(
            str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(SAMPLE_RATE_HZ, dtype=np.int64)

    def probability(self, vad: VadState, chunk: np.ndarray) -> float:
        if chunk.shape != (CHUNK_SAMPLES,):
            raise ValueError(f"VAD chunk must be ({CHUNK_SAMPLES},) float32 at 16 kHz, got {chunk.shape}")
        x = np.concatenate(
            [vad.context, chunk.reshape(1, CHUNK_SAMPLES).astype(np.float32)], axis=1
        )  # (1, 576)
        out, new_state = self._session.run(None, {"input": x, "state": vad.state, "sr": self._sr})
        vad.state = new_state
        vad.context = x[:, -CONTEXT_SAMPLES:].copy()
        return float(out[0, 0])

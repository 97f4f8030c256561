"""The frame contract, written once (docs/architecture.md): what rate each stage's audio is at.

Torch-free: the server imports it too.
"""

from __future__ import annotations

MODEL_INPUT_RATE_HZ = 16_000  # VAD and speech tokenizer input (preprocessor_config.json sampling_rate)
DECODER_RATE_HZ = 22_050  # the decoder's output (config.yaml sample_rate); a loaded decoder's own value wins
WIRE_RATE_HZ = 48_000  # Opus at the WebRTC edge
SPEECH_TOKEN_MS = 80  # one speech token: 12.5 tokens/s (the tokenizer's pooled frame rate)

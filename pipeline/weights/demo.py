"""Demo weights: tiny models in the three official formats, shaped so every reply exercises every stage.

`glm4voice demo-weights DIR` (and `serve` with no real weights, on first start) writes

    DIR/glm-4-voice-tokenizer/   tiny WhisperVQ encoder (random, fixed seed)
    DIR/glm-4-voice-9b/          tiny ChatGLM LM + tokenizer.model/tokenizer_config.json
    DIR/glm-4-voice-decoder/     tiny flow + HiFT (random, fixed seed): noise-like babble
    DIR/whisper-random/          tiny Whisper (transformers format, random): the transcripts are babble
    DIR/demo_script.json         the scripted reply (ids, transcript), for tests and the curious

Random LM weights alone would stop at once or never stop, so the LM is shaped into a deterministic
bigram chain (docs/weights.md): its residual stream is dominated by the token embedding (attention
and MLP output projections scaled by `RESIDUAL_BRANCH_SCALE`), the chain tokens get orthonormal
embeddings, and `output_layer` row `next(t)` equals `CHAIN_LOGIT_MARGIN * embedding(t) / hidden`, so
after any prompt ending with the assistant header's "\n" the LM says, token after token,
13 text tokens, 26 speech tokens, the rest of the text, 26 speech tokens ... then `<|user|>` (stop).
Every other logit stays near 0, so sampling at the official defaults (temperature 0.2, top-p 0.8,
top-k 50) follows the chain with probability ~1 - exp(-CHAIN_LOGIT_MARGIN / 0.2).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
from pathlib import Path

import torch

from pipeline.weights.random_lm import seeded_normal

log = logging.getLogger(__name__)

DEMO_FORMAT_VERSION = 2  # bump when the recipe changes: an older DIR is rebuilt on the next start
SEED = 20241025  # GLM-4-Voice release date; any fixed value works
MESSAGE = (
    "Demo weights: tiny random models, so this voice is babble. Run glm4voice download for the real one!"
)
TEXT_TOKENS_PER_CHUNK = 13  # paper: interleave 13 text tokens ...
SPEECH_TOKENS_PER_CHUNK = 26  # ... with 26 speech tokens (docs/lm.md)
SPEECH_CHUNKS = 3  # 78 speech tokens = 6.24 s of audio at 80 ms each
NUM_AUDIO_TOKENS = 512  # speech vocabulary of all three tiny stages (real: 16384)
LM_DIMS = dict(hidden_size=128, num_layers=2, num_heads=4, kv_groups=2, head_dim=32, ffn_hidden_size=256)
LM_SEQ_LENGTH = 8192  # the real context (config seq_length)
RESIDUAL_BRANCH_SCALE = 1e-3  # attention/MLP outputs this small leave the embedding in charge
CHAIN_LOGIT_MARGIN = 40.0  # next-chain-token logit; all others are ~N(0, 0.1)
OTHER_LOGIT_STD = 0.1
TOKENIZER_DIMS = dict(d_model=64, num_layers=2, num_heads=2, ffn_dim=128, block_size_frames=200)  # 4 s blocks
HEADER = "<|assistant|>streaming_transcription\n"  # the end of every turn prompt (docs/lm.md)
DONE_FILE = "DEMO_WEIGHTS.json"


def _merge_corpus() -> list[str]:
    """Texts the tiny BPE learns merges from: the message (so its words are single tokens) and prompts."""
    import pipeline.lm.prompt as prompt

    prompts = [getattr(prompt, "SYSTEM_PROMPT_AUDIO", ""), getattr(prompt, "SYSTEM_PROMPT_TEXT", "")]
    return [MESSAGE] * 4 + [p for p in prompts if p] * 2 + ["streaming_transcription\n"] * 2


def build_script(text, seed: int = SEED) -> dict:
    """The chain of ids the demo LM will speak, from a loaded GLMTokenizer."""
    message_ids = text.encode(MESSAGE)
    predecessor = text.encode(HEADER)[-1]
    if len(set(message_ids)) != len(message_ids) or predecessor in message_ids:
        raise ValueError(f"demo message tokenizes with a repeated token ({message_ids}); pick other words")
    rng = random.Random(seed)
    speech_values = rng.sample(range(text.num_audio_tokens), SPEECH_CHUNKS * SPEECH_TOKENS_PER_CHUNK)
    chain: list[int] = []
    rest_text, rest_speech = list(message_ids), list(speech_values)
    while rest_text or rest_speech:
        chain += rest_text[:TEXT_TOKENS_PER_CHUNK]
        rest_text = rest_text[TEXT_TOKENS_PER_CHUNK:]
        chain += [text.audio_id(v) for v in rest_speech[:SPEECH_TOKENS_PER_CHUNK]]
        rest_speech = rest_speech[SPEECH_TOKENS_PER_CHUNK:]
    return {
        "message": MESSAGE,
        "predecessor_id": predecessor,
        "reply_ids": chain,  # generated ids, stop token excluded
        "stop_id": text.user_id,
        "text_ids": message_ids,
        "speech_values": speech_values,
    }


def chain_hook(script: dict, seed: int = SEED):
    """A `tensor_hook` for the LM's write_random_checkpoint that installs the bigram chain (tensor by tensor,
    so a full-size checkpoint is shaped without holding it all: pipeline/weights/random_lm.py)."""
    nodes = [script["predecessor_id"], *script["reply_ids"]]  # node i predicts node i+1; last -> stop
    targets = [*script["reply_ids"], script["stop_id"]]
    g = torch.Generator().manual_seed(seed)
    chain: dict[str, torch.Tensor] = {}  # the chain's embedding rows, from the embedding to the output layer

    def hook(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name == "transformer.embedding.word_embeddings.weight":  # (V, H): the first tensor written
            hidden = tensor.shape[1]
            if len(nodes) > hidden:
                raise ValueError(f"demo chain of {len(nodes)} tokens needs hidden_size >= {len(nodes)}")
            basis, _ = torch.linalg.qr(
                torch.randn(hidden, hidden, generator=g, dtype=torch.float64)
            )  # orthonormal
            chain["embed"] = (basis[: len(nodes)] * hidden**0.5).to(tensor.dtype)  # (N, H), rms 1 per row
            tensor[torch.tensor(nodes)] = chain["embed"]
        elif name.endswith("self_attention.dense.weight") or name.endswith("mlp.dense_4h_to_h.weight"):
            tensor.mul_(RESIDUAL_BRANCH_SCALE)
        elif name == "transformer.encoder.final_layernorm.weight":
            tensor.fill_(1.0)
        elif name == "transformer.output_layer.weight":  # (V, H)
            vocab, hidden = tensor.shape
            seeded_normal(
                (vocab, hidden), OTHER_LOGIT_STD / hidden**0.5, 0.0, tensor.dtype, g, out=tensor
            )  # in place
            tensor[torch.tensor(targets)] = (chain["embed"].float() * (CHAIN_LOGIT_MARGIN / hidden)).to(
                tensor.dtype
            )
        return tensor

    return hook


def write_demo_weights(root: Path, seed: int = SEED) -> dict:
    """Write the four checkpoints and the script into `root` (overwriting)."""
    import pipeline.weights.random_decoder as decoder_mod
    import pipeline.weights.random_lm as lm_mod
    import pipeline.weights.random_tokenizer as tokenizer_mod
    import pipeline.weights.random_whisper as whisper_mod
    from pipeline.lm.text_tokenizer import GLMTokenizer
    from pipeline.weights.random_text import write_tokenizer_files

    lm_dir = root / "glm-4-voice-9b"
    write_tokenizer_files(lm_dir, merges_text=_merge_corpus(), num_audio_tokens=NUM_AUDIO_TOKENS, seed=seed)
    text = GLMTokenizer.from_pretrained(lm_dir)
    script = build_script(text, seed)
    vocab = -(-text.vocab_size // 64) * 64  # padded like padded_vocab_size
    lm_mod.write_random_checkpoint(
        lm_dir,
        **LM_DIMS,
        vocab_size=vocab,
        seed=seed,
        tensor_hook=chain_hook(script, seed),
        seq_length=LM_SEQ_LENGTH,
        eos_token_ids=sorted(text.stop_ids),
    )
    tokenizer_mod.write_random_checkpoint(
        root / "glm-4-voice-tokenizer", **TOKENIZER_DIMS, codebook_size=NUM_AUDIO_TOKENS, seed=seed + 1
    )
    decoder_mod.write_random_checkpoint(
        root / "glm-4-voice-decoder", vocab_size=NUM_AUDIO_TOKENS, seed=seed + 2
    )
    whisper_mod.write_random_checkpoint(root / whisper_mod.DEMO_FOLDER, seed=seed + 3)
    (root / "demo_script.json").write_text(json.dumps(script, indent=2), encoding="utf-8")
    return script


def ensure_demo_weights(root: Path) -> Path:
    """The demo weights folder, written first if it is missing or from an older recipe."""
    root = Path(root).expanduser().resolve()
    marker = root / DONE_FILE
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")).get("version") == DEMO_FORMAT_VERSION:
                return root
        except (json.JSONDecodeError, OSError):
            pass
    log.warning("writing demo weights (tiny random models) to %s", root)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_demo_weights(tmp)
    (tmp / DONE_FILE).write_text(
        json.dumps({"version": DEMO_FORMAT_VERSION, "seed": SEED, "kind": "demo"}), encoding="utf-8"
    )
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)  # atomic: a half-written folder is never taken for demo weights
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="glm4voice demo-weights",
        description="Write tiny demo checkpoints (official formats, scripted replies) into DIR.",
    )
    parser.add_argument("dir", help="output folder")
    parser.add_argument("--force", action="store_true", help="rewrite even if DIR already holds demo weights")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if args.force:
        (root / DONE_FILE).unlink(missing_ok=True)
    path = ensure_demo_weights(root)
    print(f"demo weights in {path} (serve with GLM4VOICE_MODEL_DEMO_WEIGHTS_DIR={path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

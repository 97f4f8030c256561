"""Random LMs in the official `glm-4-voice-9b` format: ChatGLM config.json, safetensors shards + index."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from pipeline.lm.convert import INDEX_FILE, LMConfig, build_glm_model
from pipeline.lm.model import VoiceLM

# glm-4-voice-9b's sizes (its config.json): 9.4 B parameters, 18.8 GB in bf16.
FULL_SIZE = LMConfig(
    num_layers=40,
    hidden_size=4096,
    ffn_hidden_size=13696,
    num_heads=32,
    kv_groups=2,
    head_dim=128,
    vocab_size=168960,
    seq_length=8192,
    rope_theta=10000.0,
    rms_eps=3.90625e-08,
    qkv_bias=True,
    eos_token_ids=(151329, 151336, 151338),
    checkpoint_dtype="bfloat16",
)


def random_glm_tensors(
    cfg: LMConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """GLM-named tensors made one at a time on `device` (no checkpoint, host memory untouched on a GPU):
    compute cost does not depend on the values. Linear N(0, 1/fan_in), embeddings N(0, 1), norms ~1."""
    h, f, v, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return torch.empty(shape, device=device, dtype=dtype).normal_(mean, std, generator=g)

    yield "model.embed_tokens.weight", normal(v, h, std=1.0), "random"
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", normal(h, mean=1.0), "random"
        for name, rows in (("q", cfg.num_heads * d), ("k", cfg.kv_groups * d), ("v", cfg.kv_groups * d)):
            yield f"{p}self_attn.{name}_proj.weight", normal(rows, h, std=h**-0.5), "random"
            yield f"{p}self_attn.{name}_proj.bias", normal(rows), "random"
        yield (
            p + "self_attn.o_proj.weight",
            normal(h, cfg.num_heads * d, std=(cfg.num_heads * d) ** -0.5),
            "random",
        )
        yield p + "post_attention_layernorm.weight", normal(h, mean=1.0), "random"
        yield p + "mlp.gate_up_proj.weight", normal(2 * f, h, std=h**-0.5), "random"
        yield p + "mlp.down_proj.weight", normal(h, f, std=f**-0.5), "random"
    yield "model.norm.weight", normal(h, mean=1.0), "random"
    yield "lm_head.weight", normal(v, h, std=h**-0.5), "random"


def random_voice_lm(
    cfg: LMConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0, int4: bool = False
) -> VoiceLM:
    """A `VoiceLM` with random weights built directly on `device` (bench, GPU check: no disk, no host
    copy)."""
    dev = torch.device(device)
    tensor_dtype = torch.bfloat16 if int4 else dtype
    model = build_glm_model(
        cfg, random_glm_tensors(cfg, dev, tensor_dtype, seed), dev, tensor_dtype, int4, source="random"
    )
    return VoiceLM(model, cfg, None, dev, tensor_dtype, "int4" if int4 else None)


LARGE_TENSOR_ELEMENTS = 1 << 26  # past this, values are drawn in row chunks (bounded float32 scratch)
SHARD_BYTES = (
    1 << 30
)  # a shard is written (and freed) once it holds this much: the writer's memory is bounded
TensorHook = Callable[[str, torch.Tensor], torch.Tensor]  # (official name, tensor) -> the tensor to write


def chatglm_shapes(cfg: LMConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Official key names and shapes of a glm-4-voice-9b checkpoint, in file order (docs/lm.md)."""
    h, f, v, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.head_dim
    qkv = (cfg.num_heads + 2 * cfg.kv_groups) * d
    out = [("transformer.embedding.word_embeddings.weight", (v, h))]
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attention.query_key_value.weight", (qkv, h)),
            (p + "self_attention.query_key_value.bias", (qkv,)),
            (p + "self_attention.dense.weight", (h, cfg.num_heads * d)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.dense_h_to_4h.weight", (2 * f, h)),
            (p + "mlp.dense_4h_to_h.weight", (h, f)),
        ]
    out += [
        ("transformer.encoder.final_layernorm.weight", (h,)),
        ("transformer.output_layer.weight", (v, h)),
        ("transformer.rotary_pos_emb.inv_freq", (d // 4,)),
    ]
    return out


def seeded_normal(
    shape: tuple[int, ...],
    std: float,
    mean: float,
    dtype: torch.dtype,
    g: torch.Generator,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """N(mean, std) in `dtype` (into `out` when given); a large tensor is drawn in row chunks so the float32
    scratch stays small (a small one in one draw: the values of the demo weights never change)."""
    out = torch.empty(shape, dtype=dtype) if out is None else out
    if out.numel() <= LARGE_TENSOR_ELEMENTS:
        return out.copy_(torch.randn(*shape, generator=g) * std + mean)
    rows = max(1, LARGE_TENSOR_ELEMENTS // (out.numel() // shape[0]))
    for start in range(0, shape[0], rows):
        chunk = out[start : start + rows]
        chunk.copy_(torch.randn(chunk.shape, generator=g) * std + mean)
    return out


def random_chatglm_tensors(
    cfg: LMConfig, seed: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Official names with seeded values, one tensor at a time (linear N(0, 1/fan_in), embeddings N(0, 1),
    norms 1 + 0.2 N, qkv bias 0.2 N): what `random_chatglm_state` held all at once, in the same draw order."""
    g = torch.Generator().manual_seed(seed)
    for name, shape in chatglm_shapes(cfg):
        if name.endswith("inv_freq"):
            rot = cfg.head_dim // 2
            yield name, 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        elif name.endswith("layernorm.weight"):
            yield name, seeded_normal(shape, 0.2, 1.0, dtype, g)
        elif name.endswith("query_key_value.bias"):
            yield name, seeded_normal(shape, 0.2, 0.0, dtype, g)
        elif name.endswith("word_embeddings.weight"):
            yield name, seeded_normal(shape, 1.0, 0.0, dtype, g)
        else:  # a linear layer (out, in): N(0, 1/in)
            yield name, seeded_normal(shape, shape[1] ** -0.5, 0.0, dtype, g)


def _shard_plan(
    shapes: list[tuple[str, tuple[int, ...]]], element_bytes: int, num_shards: int
) -> list[list[str]]:
    """Names per shard, consecutive: `num_shards` of about equal bytes (a tensor goes where its middle falls);
    num_shards <= 0: shards of about SHARD_BYTES each."""
    sizes = [(name, element_bytes * _numel(shape)) for name, shape in shapes]
    total = sum(s for _, s in sizes)
    n = num_shards if num_shards > 0 else max(1, -(-total // SHARD_BYTES))
    plan: dict[int, list[str]] = {}
    start = 0
    for name, size in sizes:
        plan.setdefault(min(n - 1, int((start + size / 2) * n // max(total, 1))), []).append(name)
        start += size
    return [plan[k] for k in sorted(plan)]


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file, written from the tensors' own memory: safetensors' `save_file` copies every
    tensor to bytes first, which doubles the peak at a 1.4 GB embedding. Format: a little-endian u64 header
    length, the JSON header (offsets), then the raw data in header order."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for tensor in tensors.values():
            f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))  # no copy


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_random_checkpoint(
    out_dir: str | Path,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    kv_groups: int,
    head_dim: int,
    ffn_hidden_size: int,
    vocab_size: int,
    seed: int,
    num_shards: int = 2,
    tensor_hook: TensorHook | None = None,
    dtype: torch.dtype = torch.float32,
    seq_length: int = 8192,
    eos_token_ids: list[int] | None = None,
) -> None:
    """A random glm-4-voice-9b-format checkpoint: ChatGLM config.json, safetensors shards + index.

    Tensors are made one at a time and each shard is written and freed as soon as it is complete, so the
    writer holds at most one shard (`num_shards` of the total; `num_shards=0`: shards of SHARD_BYTES) plus the
    tensor in hand: a full-size 9B checkpoint is written in ~3 GB. `tensor_hook` may replace any tensor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "_name_or_path": "random-glm-4-voice-9b",
        "model_type": "chatglm",
        "architectures": ["ChatGLMForConditionalGeneration"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "classifier_dropout": None,
        "ffn_hidden_size": ffn_hidden_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": hidden_size,
        "kv_channels": head_dim,
        "layernorm_epsilon": 3.90625e-08,
        "multi_query_attention": True,
        "multi_query_group_num": kv_groups,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_layers": num_layers,
        "original_rope": True,
        "padded_vocab_size": vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": 1,
        "seq_length": seq_length,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name,
        "transformers_version": "4.44.1",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if eos_token_ids:
        config["eos_token_id"], config["pad_token_id"] = list(eos_token_ids), eos_token_ids[0]
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    cfg = LMConfig.from_chatglm_json(out / "config.json")
    plan = _shard_plan(chatglm_shapes(cfg), torch.empty(0, dtype=dtype).element_size(), num_shards)
    shard_of = {name: n for n, names in enumerate(plan) for name in names}
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    total = 0
    for name, tensor in random_chatglm_tensors(cfg, seed, dtype):
        if tensor_hook is not None:
            tensor = tensor_hook(name, tensor)
        shard[name] = tensor.contiguous()
        total += tensor.numel() * tensor.element_size()
        n = shard_of[name]
        if name == plan[n][-1]:  # the shard is complete: write it, let it go
            file = f"model-{n + 1:05d}-of-{len(plan):05d}.safetensors"
            save_shard(shard, out / file)
            weight_map.update(dict.fromkeys(shard, file))
            shard = {}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")

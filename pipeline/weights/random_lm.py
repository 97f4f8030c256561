"""Random LMs in the official `glm-4-voice-9b` format: ChatGLM config.json, safetensors shards + index."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.lm.convert import INDEX_FILE, LMConfig, build_glm_model
from pipeline.lm.model import VoiceLM

# glm-4-voice-9b's sizes (its config.json): 9.4 B parameters, 18.8 GB in bf16.
FULL_SIZE = LMConfig(num_layers=40, hidden_size=4096, ffn_hidden_size=13696, num_heads=32, kv_groups=2, head_dim=128,
                     vocab_size=168960, seq_length=8192, rope_theta=10000.0, rms_eps=3.90625e-08, qkv_bias=True,
                     eos_token_ids=(151329, 151336, 151338), checkpoint_dtype="bfloat16")  # fmt: skip


def random_glm_tensors(cfg: LMConfig, device: torch.device, dtype: torch.dtype,
                       seed: int = 0) -> Iterator[tuple[str, torch.Tensor, str]]:  # fmt: skip
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
        yield p + "self_attn.o_proj.weight", normal(h, cfg.num_heads * d, std=(cfg.num_heads * d) ** -0.5), "random"
        yield p + "post_attention_layernorm.weight", normal(h, mean=1.0), "random"
        yield p + "mlp.gate_up_proj.weight", normal(2 * f, h, std=h**-0.5), "random"
        yield p + "mlp.down_proj.weight", normal(h, f, std=f**-0.5), "random"
    yield "model.norm.weight", normal(h, mean=1.0), "random"
    yield "lm_head.weight", normal(v, h, std=h**-0.5), "random"


def random_voice_lm(cfg: LMConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
                    int4: bool = False) -> VoiceLM:  # fmt: skip
    """A `VoiceLM` with random weights built directly on `device` (bench, GPU check: no disk, no host copy)."""
    dev = torch.device(device)
    tensor_dtype = torch.bfloat16 if int4 else dtype
    model = build_glm_model(cfg, random_glm_tensors(cfg, dev, tensor_dtype, seed), dev, tensor_dtype, int4,
                            source="random")  # fmt: skip
    return VoiceLM(model, cfg, None, dev, tensor_dtype, "int4" if int4 else None)


def random_chatglm_state(cfg: LMConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Official key names with seeded values (linear N(0, 1/fan_in), embeddings N(0,1), norms 1+0.2N)."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std + mean).to(dtype)

    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    qkv = (cfg.num_heads + 2 * cfg.kv_groups) * cfg.head_dim
    sd = {"transformer.embedding.word_embeddings.weight": normal(v, h, std=1.0)}
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = normal(h, std=0.2, mean=1.0)
        sd[p + "self_attention.query_key_value.weight"] = normal(qkv, h, std=h**-0.5)
        sd[p + "self_attention.query_key_value.bias"] = normal(qkv, std=0.2)
        sd[p + "self_attention.dense.weight"] = normal(h, cfg.num_heads * cfg.head_dim, std=(cfg.num_heads * cfg.head_dim) ** -0.5)
        sd[p + "post_attention_layernorm.weight"] = normal(h, std=0.2, mean=1.0)
        sd[p + "mlp.dense_h_to_4h.weight"] = normal(2 * f, h, std=h**-0.5)
        sd[p + "mlp.dense_4h_to_h.weight"] = normal(h, f, std=f**-0.5)
    sd["transformer.encoder.final_layernorm.weight"] = normal(h, std=0.2, mean=1.0)
    sd["transformer.output_layer.weight"] = normal(v, h, std=h**-0.5)
    rot = cfg.head_dim // 2
    sd["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    return sd


def write_random_checkpoint(
    out_dir: str | Path, *, hidden_size: int, num_layers: int, num_heads: int, kv_groups: int, head_dim: int,
    ffn_hidden_size: int, vocab_size: int, seed: int, num_shards: int = 2,
    state_dict_hook: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    dtype: torch.dtype = torch.float32, seq_length: int = 8192, eos_token_ids: list[int] | None = None,
) -> None:
    """A random glm-4-voice-9b-format checkpoint: ChatGLM config.json, `num_shards` safetensors + index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "_name_or_path": "random-glm-4-voice-9b", "model_type": "chatglm",
        "architectures": ["ChatGLMForConditionalGeneration"],
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True, "classifier_dropout": None, "ffn_hidden_size": ffn_hidden_size,
        "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": hidden_size, "kv_channels": head_dim,
        "layernorm_epsilon": 3.90625e-08, "multi_query_attention": True, "multi_query_group_num": kv_groups,
        "num_attention_heads": num_heads, "num_hidden_layers": num_layers, "num_layers": num_layers,
        "original_rope": True, "padded_vocab_size": vocab_size, "post_layer_norm": True, "rmsnorm": True,
        "rope_ratio": 1, "seq_length": seq_length, "tie_word_embeddings": False, "torch_dtype": dtype_name,
        "transformers_version": "4.44.1", "use_cache": True, "vocab_size": vocab_size,
    }  # fmt: skip
    if eos_token_ids:
        config["eos_token_id"], config["pad_token_id"] = list(eos_token_ids), eos_token_ids[0]
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    cfg = LMConfig.from_chatglm_json(out / "config.json")
    sd = random_chatglm_state(cfg, seed, dtype)
    if state_dict_hook is not None:
        sd = state_dict_hook(sd)
    names = list(sd)
    per_shard = math.ceil(len(names) / max(1, num_shards))
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map: dict[str, str] = {}
    for n, group in enumerate(groups, 1):
        file = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in group}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")

"""glm-4-voice-9b (ChatGLM format) -> transformers' native `GlmForCausalLM`: config, keys, shard-by-shard load.

REFERENCE §3.1 (config), §3.3 (keys), §3.4 (mapping). No `trust_remote_code`, nothing fetched at run time.
`write_random_checkpoint` writes the same official format (used by tests and the demo weights).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import GlmConfig, GlmForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_IGNORED_KEYS = ("transformer.rotary_pos_emb.inv_freq",)  # RoPE table buffer; recomputed (§3.3)
# ChatGLM switches this implementation does not carry; any other value changes the maths.
_REQUIRED = {
    "rmsnorm": True, "post_layer_norm": True, "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False, "original_rope": True,
}  # fmt: skip


@dataclass(frozen=True)
class LMConfig:
    """Sizes of the language model, read from the checkpoint's ChatGLM `config.json`."""

    num_layers: int
    hidden_size: int  # channels of the residual stream
    ffn_hidden_size: int  # SwiGLU inner width (dense_h_to_4h outputs twice this)
    num_heads: int  # query heads
    kv_groups: int  # multi_query_group_num: K/V heads shared by num_heads / kv_groups query heads each
    head_dim: int  # kv_channels
    vocab_size: int  # padded_vocab_size: rows of the embedding and output layer
    seq_length: int  # tokens: RoPE table length = hard context limit of the official code (§3.2)
    rope_theta: float  # 10000 * rope_ratio
    rms_eps: float  # layernorm_epsilon (3.90625e-08 in glm-4-voice-9b, not GLM-4's 1.5625e-07)
    qkv_bias: bool  # add_qkv_bias
    eos_token_ids: tuple[int, ...]  # config eos_token_id: stop ids of HF generate
    checkpoint_dtype: str  # torch_dtype of the saved weights

    @classmethod
    def from_chatglm_json(cls, path: str | Path) -> LMConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a glm-4-voice-9b checkpoint directory")
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if cfg.get("model_type") != "chatglm":
            raise ValueError(f"{path}: model_type is {cfg.get('model_type')!r}, a glm-4-voice-9b config says 'chatglm'")
        for key, want in _REQUIRED.items():
            if key in cfg and bool(cfg[key]) != want:
                raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (glm-4-voice-9b has {want})")
        try:
            eos = cfg.get("eos_token_id") or []
            return cls(
                num_layers=int(cfg["num_layers"]),
                hidden_size=int(cfg["hidden_size"]),
                ffn_hidden_size=int(cfg["ffn_hidden_size"]),
                num_heads=int(cfg["num_attention_heads"]),
                # Without multi-query attention ChatGLM gives every query head its own K/V head.
                kv_groups=int(cfg["multi_query_group_num"] if cfg.get("multi_query_attention", True)
                              else cfg["num_attention_heads"]),  # fmt: skip
                head_dim=int(cfg.get("kv_channels") or cfg["hidden_size"] // cfg["num_attention_heads"]),
                vocab_size=int(cfg.get("padded_vocab_size") or cfg["vocab_size"]),
                seq_length=int(cfg["seq_length"]),
                rope_theta=10000.0 * float(cfg.get("rope_ratio", 1)),
                rms_eps=float(cfg["layernorm_epsilon"]),
                qkv_bias=bool(cfg.get("add_qkv_bias", True)),
                eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
                checkpoint_dtype=str(cfg.get("torch_dtype", "bfloat16")),
            )
        except KeyError as err:
            raise ValueError(f"{path}: missing key {err.args[0]!r} of a ChatGLM config") from err

    def to_glm_config(self) -> GlmConfig:
        """The same model as transformers' `GlmConfig` (model_type "glm", REFERENCE §3.4)."""
        config = GlmConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.kv_groups,
            head_dim=self.head_dim,
            max_position_embeddings=self.seq_length,
            rms_norm_eps=self.rms_eps,
            attention_bias=self.qkv_bias,
            tie_word_embeddings=False,
            hidden_act="silu",
            pad_token_id=None,  # only sets nn.Embedding.padding_idx (a training detail)
            eos_token_id=list(self.eos_token_ids) or None,
            # ChatGLM rotates kv_channels // 2 dims of each head in interleaved pairs (= HF-GLM's layout).
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": 0.5},
        )
        config._attn_implementation = "sdpa"
        return config


def chatglm_to_glm(name: str, tensor: torch.Tensor, cfg: LMConfig) -> list[tuple[str, torch.Tensor]]:
    """One official tensor -> the `GlmForCausalLM` tensors it becomes (qkv is split; gate/up stays fused)."""
    if name == "transformer.embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", tensor)]
    if name == "transformer.output_layer.weight":
        return [("lm_head.weight", tensor)]
    if name == "transformer.encoder.final_layernorm.weight":
        return [("model.norm.weight", tensor)]
    prefix = "transformer.encoder.layers."
    if not name.startswith(prefix):
        raise KeyError(name)
    index, rest = name[len(prefix) :].split(".", 1)
    out = f"model.layers.{index}."
    if rest.startswith("self_attention.query_key_value."):
        q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.kv_groups * cfg.head_dim
        q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)  # rows [Q | K | V], head-major (§3.2)
        kind = rest.rsplit(".", 1)[1]
        return [(f"{out}self_attn.{p}_proj.{kind}", t.contiguous()) for p, t in zip("qkv", (q, k, v), strict=True)]
    renames = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_attention_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.dense.weight": "self_attn.o_proj.weight",
        "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate | up], gate first in both
        "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    }
    if rest not in renames:
        raise KeyError(name)
    return [(out + renames[rest], tensor)]


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir, checked to exist (index first, else one file)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index}: no 'weight_map'")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shard {missing[0]} listed in {index} is missing")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE}: not a glm-4-voice-9b checkpoint")


def iter_checkpoint(path: Path, cfg: LMConfig) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(GLM name, tensor, file) one tensor at a time: host memory holds one official tensor, never the model."""
    for file in shard_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in _IGNORED_KEYS:
                    continue
                try:
                    mapped = chatglm_to_glm(name, f.get_tensor(name), cfg)
                except KeyError:
                    raise ValueError(f"{file}: unexpected tensor {name!r} for a glm-4-voice-9b checkpoint") from None
                for glm_name, tensor in mapped:
                    yield glm_name, tensor, file


def _quantized_skeleton(model: GlmForCausalLM) -> None:
    """Swap every decoder-layer Linear for bitsandbytes NF4 (double quant, bf16 compute), as the official
    `--dtype int4` server does; the embedding and lm_head stay bf16, as bitsandbytes leaves them (§6)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True,
                                          quant_type="nf4", device="meta")  # fmt: skip
                    setattr(parent, child_name, q)


def load_glm_model(path: Path, cfg: LMConfig, device: torch.device, dtype: torch.dtype, int4: bool) -> GlmForCausalLM:
    """`GlmForCausalLM` filled tensor by tensor from the shards of an official checkpoint dir."""
    return build_glm_model(cfg, iter_checkpoint(path, cfg), device, dtype, int4, source=path)


def build_glm_model(
    cfg: LMConfig, tensors: Iterable[tuple[str, torch.Tensor, Path | str]], device: torch.device,
    dtype: torch.dtype, int4: bool, source: Path | str,
) -> GlmForCausalLM:  # fmt: skip
    """Build `GlmForCausalLM` with empty (meta) weights and assign (GLM name, tensor, file) as they come."""
    with torch.device("meta"):
        model = GlmForCausalLM(cfg.to_glm_config())
    if int4:
        _quantized_skeleton(model)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for name, tensor, file in tensors:
        target = params.get(name)
        if target is None:
            raise ValueError(f"{file}: tensor for {name!r} has no place in a {cfg.num_layers}-layer model")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        quantize = int4 and attr == "weight" and type(module).__name__ == "Linear4bit"
        want = (module.out_features, module.in_features) if quantize else tuple(target.shape)
        if tuple(tensor.shape) != want:
            what = " (vocab mismatch with padded_vocab_size)" if "embed" in name or "lm_head" in name else ""
            raise ValueError(f"{file}: {name} has shape {tuple(tensor.shape)}, config.json implies {want}{what}")
        if quantize:
            import bitsandbytes as bnb

            new = bnb.nn.Params4bit(tensor.to(torch.bfloat16), requires_grad=False, quant_type="nf4",
                                    compress_statistics=True).to(device)  # fmt: skip
            module.weight = new  # quantised by the move to `device`
        else:
            module._parameters[attr] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
        seen.add(name)
        del tensor
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} tensors, first {missing[0]!r} (a shard missing?)")
    # Non-persistent RoPE buffers were created on meta; rebuild them on the device.
    rope_cls = type(model.model.rotary_emb)
    model.model.rotary_emb = rope_cls(config=model.config).to(device)
    return model.eval()


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

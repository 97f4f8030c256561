"""glm-4-voice-9b (ChatGLM format) -> transformers' native `GlmForCausalLM`: config, keys, shard-by-shard
load.

Config and key mapping: docs/lm.md. No `trust_remote_code`, nothing fetched at run time.
pipeline/weights/random_lm.py writes the same official format (tests, demo weights, bench).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import GlmConfig, GlmForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_IGNORED_KEYS = ("transformer.rotary_pos_emb.inv_freq",)  # RoPE table buffer; recomputed
# ChatGLM switches this implementation does not carry; any other value changes the maths.
_REQUIRED = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
    "original_rope": True,
}


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
    seq_length: int  # tokens: RoPE table length = hard context limit of the official code
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
            raise ValueError(
                f"{path}: model_type is {cfg.get('model_type')!r}, a glm-4-voice-9b config says 'chatglm'"
            )
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
                kv_groups=int(
                    cfg["multi_query_group_num"]
                    if cfg.get("multi_query_attention", True)
                    else cfg["num_attention_heads"]
                ),
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
        """The same model as transformers' `GlmConfig` (model_type "glm", docs/lm.md)."""
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
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": 0.5,
            },
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
        q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)  # rows [Q | K | V], head-major (docs/lm.md)
        kind = rest.rsplit(".", 1)[1]
        return [
            (f"{out}self_attn.{p}_proj.{kind}", t.contiguous()) for p, t in zip("qkv", (q, k, v), strict=True)
        ]
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
    raise FileNotFoundError(
        f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE}: not a glm-4-voice-9b checkpoint"
    )


def iter_checkpoint(path: Path, cfg: LMConfig) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(GLM name, tensor, file) one tensor at a time: host memory holds one official tensor, never the
    model."""
    for file in shard_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in _IGNORED_KEYS:
                    continue
                try:
                    mapped = chatglm_to_glm(name, f.get_tensor(name), cfg)
                except KeyError:
                    raise ValueError(
                        f"{file}: unexpected tensor {name!r} for a glm-4-voice-9b checkpoint"
                    ) from None
                for glm_name, tensor in mapped:
                    yield glm_name, tensor, file


def _quantized_skeleton(model: GlmForCausalLM) -> None:
    """Swap every decoder-layer Linear for bitsandbytes NF4 (double quant, bf16 compute), as the official
    `--dtype int4` server does; the embedding and lm_head stay bf16, as bitsandbytes leaves them
    (docs/lm.md)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        compute_dtype=torch.bfloat16,
                        compress_statistics=True,
                        quant_type="nf4",
                        device="meta",
                    )
                    setattr(parent, child_name, q)


def load_glm_model(
    path: Path, cfg: LMConfig, device: torch.device, dtype: torch.dtype, int4: bool
) -> GlmForCausalLM:
    """`GlmForCausalLM` filled tensor by tensor from the shards of an official checkpoint dir."""
    return build_glm_model(cfg, iter_checkpoint(path, cfg), device, dtype, int4, source=path)


def build_glm_model(
    cfg: LMConfig,
    tensors: Iterable[tuple[str, torch.Tensor, Path | str]],
    device: torch.device,
    dtype: torch.dtype,
    int4: bool,
    source: Path | str,
) -> GlmForCausalLM:
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
            raise ValueError(
                f"{file}: {name} has shape {tuple(tensor.shape)}, config.json implies {want}{what}"
            )
        if quantize:
            import bitsandbytes as bnb

            new = bnb.nn.Params4bit(
                tensor.to(torch.bfloat16), requires_grad=False, quant_type="nf4", compress_statistics=True
            ).to(device)
            module.weight = new  # quantised by the move to `device`
        else:
            module._parameters[attr] = nn.Parameter(
                tensor.to(device=device, dtype=dtype), requires_grad=False
            )
        seen.add(name)
        del tensor
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(
            f"{source}: checkpoint lacks {len(missing)} tensors, first {missing[0]!r} (a shard missing?)"
        )
    # Non-persistent RoPE buffers were created on meta; rebuild them on the device.
    rope_cls = type(model.model.rotary_emb)
    model.model.rotary_emb = rope_cls(config=model.config).to(device)
    return model.eval()

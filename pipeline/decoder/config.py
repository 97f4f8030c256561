"""The decoder's sizes, read from the official `config.yaml` as data (HyperPyYAML tags never build
anything)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.audio_format import DECODER_RATE_HZ
from pipeline.decoder.flow import FlowConfig
from pipeline.decoder.hift import HiftConfig

TOKEN_OVERLAP = 5  # `token_overlap_len` of flow_inference.AudioDecoder: 5 tokens of mel cross-fade
MEL_CACHE_FRAMES = 1  # `mel_cache_len`: mel frames re-vocoded at each seam


class _Ref(str):
    """`!ref <key>` kept as text until the whole document is read."""


class _DataLoader(yaml.SafeLoader):
    """Reads HyperPyYAML tags as plain values: `!new:`/`!name:` -> their mapping (+ `_class`), `!apply:` ->
    ignored, `!ref` -> resolved lookup. Never imports or builds anything."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> object:
    if isinstance(node, yaml.MappingNode):
        value = dict(loader.construct_mapping(node, deep=True))
        value["_class"] = suffix.partition(":")[2]  # `!new:pkg.Class` -> "pkg.Class" (never imported)
        return value
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    text = loader.construct_scalar(node)
    return _Ref(text) if suffix == "ref" else text


_DataLoader.add_multi_constructor("!", _tagged)


def _resolve(value: object, root: dict, path: str) -> object:
    if isinstance(value, _Ref):
        text = value.strip()
        if not (text.startswith("<") and text.endswith(">") and text.count("<") == 1):
            raise ValueError(f"config.yaml {path}: unsupported !ref expression {text!r}")
        target: object = root
        for part in text[1:-1].split("."):
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"config.yaml {path}: !ref {text} names no key")
            target = target[part]
        return _resolve(target, root, path)
    if isinstance(value, dict):
        return {k: _resolve(v, root, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def read_config_yaml(path: Path) -> dict:
    """config.yaml as a plain dict (tags read as values, `!ref`s resolved)."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_DataLoader)  # noqa: S506 - data-only loader
    except FileNotFoundError as err:
        raise ValueError(f"{path}: missing (a glm-4-voice-decoder directory holds config.yaml)") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not readable YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return _resolve(raw, raw, "")  # type: ignore[return-value]


@dataclass(frozen=True)
class DecoderConfig:
    sample_rate_hz: int  # 22050
    flow: FlowConfig
    hift: HiftConfig
    mel_overlap_frames: int  # int(5 / 12.5 * DECODER_RATE_HZ / 256) = 34 frames of Hamming cross-fade
    mel_cache_frames: int  # 1
    source_cache_samples: int  # 256 = mel_cache_frames * 256

    @classmethod
    def from_yaml_file(cls, path: Path) -> DecoderConfig:
        doc = read_config_yaml(path)
        for key in ("flow", "hift"):
            if not isinstance(doc.get(key), dict):
                raise ValueError(f"{path}: no '{key}' section")
        flow, hift = FlowConfig.from_yaml(doc["flow"]), HiftConfig.from_yaml(doc["hift"])
        sr = int(doc.get("sample_rate", hift.sample_rate_hz))
        if sr != hift.sample_rate_hz or hift.samples_per_frame != 256:
            raise ValueError(f"{path}: expected {DECODER_RATE_HZ} Hz audio at 256 samples per mel frame")
        return cls(
            sample_rate_hz=sr,
            flow=flow,
            hift=hift,
            mel_overlap_frames=int(TOKEN_OVERLAP / flow.token_rate_hz * DECODER_RATE_HZ / 256),
            mel_cache_frames=MEL_CACHE_FRAMES,
            source_cache_samples=MEL_CACHE_FRAMES * 256,
        )

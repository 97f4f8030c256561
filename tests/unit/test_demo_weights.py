"""Demo weights: official formats, loadable by every stage, and a reply that exercises every stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pipeline.weights.demo as demo_weights
from pipeline.decoder.model import SpeechDecoder
from pipeline.decoder.stream import synthesize
from pipeline.lm.model import VoiceLM
from pipeline.lm.prompt import user_turn_ids
from pipeline.responder import SamplingSettings
from pipeline.tokenizer.tokenizer import SpeechTokenizer
from tests.helpers.prompts import first_turn_ids


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return demo_weights.ensure_demo_weights(tmp_path_factory.mktemp("demo") / "weights")


@pytest.fixture(scope="module")
def lm(demo_root):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: thread hand-offs cost more than they save (as the engine does)
    yield VoiceLM.from_pretrained(demo_root / "glm-4-voice-9b")
    torch.set_num_threads(threads)


def test_official_layout(demo_root):
    assert (demo_root / "glm-4-voice-9b" / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in (demo_root / "glm-4-voice-9b").glob("model-*-of-*.safetensors"))
    assert {"config.yaml", "flow.pt", "hift.pt"} <= {
        p.name for p in (demo_root / "glm-4-voice-decoder").iterdir()
    }
    assert {"config.json", "preprocessor_config.json"} <= {
        p.name for p in (demo_root / "glm-4-voice-tokenizer").iterdir()
    }
    cfg = json.loads((demo_root / "glm-4-voice-9b" / "config.json").read_text())
    assert cfg["model_type"] == "chatglm"


def test_ensure_is_idempotent_and_rebuilds_stale(demo_root, tmp_path):
    marker = demo_root / demo_weights.DONE_FILE
    before = marker.stat().st_mtime_ns
    assert demo_weights.ensure_demo_weights(demo_root) == demo_root
    assert marker.stat().st_mtime_ns == before  # not rewritten
    # an interrupted write (no marker) is never taken for demo weights
    partial = tmp_path / "w"
    (partial / "glm-4-voice-9b").mkdir(parents=True)
    assert demo_weights.ensure_demo_weights(partial) == partial.resolve()
    assert (partial / demo_weights.DONE_FILE).is_file()
    # same seed -> same script
    script = json.loads((demo_root / "demo_script.json").read_text())
    assert json.loads((partial / "demo_script.json").read_text()) == script


def _speech_and_text(lm, ids):
    tok = lm.tokenizer
    return [i for i in ids if tok.is_audio(i)], [
        i for i in ids if not tok.is_audio(i) and i not in tok.stop_ids
    ]


@pytest.mark.parametrize("turn", ["speech", "text"])
def test_reply_follows_the_13_26_rhythm_and_stops(lm, demo_root, turn):
    script = json.loads((demo_root / "demo_script.json").read_text())
    tok, s = lm.tokenizer, SamplingSettings()  # official defaults: temperature 0.2, top-p 0.8, top-k 50
    item = {"speech_tokens": [5, 17, 300, 2]} if turn == "speech" else {"text": "hello, who are you?"}
    prompt = first_turn_ids(tok, **item)
    out = lm.generate(prompt, 400, s.temperature, s.top_p, s.top_k, stop_ids=tok.stop_ids, seed=3)
    assert out[-1] == tok.user_id  # stops with <|user|>
    reply = out[:-1]
    assert reply == script["reply_ids"]
    speech, text = _speech_and_text(lm, reply)
    assert tok.decode(text) == demo_weights.MESSAGE
    assert len(speech) * 80 >= 5000  # several seconds of audio (80 ms per speech token)
    # the 13/26 rhythm: runs of text then speech
    kinds = "".join("s" if tok.is_audio(i) else "t" for i in reply)
    runs = [len(r) for r in kinds.replace("ts", "t s").replace("st", "s t").split()]
    assert runs[0] == 13 and runs[1] == 26
    # a second turn on top of the first also gets the whole scripted reply
    second = prompt + reply + user_turn_ids(tok, text="and again?")
    out2 = lm.generate(second, 400, s.temperature, s.top_p, s.top_k, stop_ids=tok.stop_ids, seed=4)
    assert out2[:-1] == script["reply_ids"]


def test_other_stages_load_and_make_sound(demo_root):
    script = json.loads((demo_root / "demo_script.json").read_text())
    tokenizer = SpeechTokenizer.from_pretrained(demo_root / "glm-4-voice-tokenizer")
    t = np.linspace(0, 1.5, 24000, dtype=np.float32)
    tokens = tokenizer.tokenize((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    assert tokens and all(0 <= k < demo_weights.NUM_AUDIO_TOKENS for k in tokens)
    decoder = SpeechDecoder.from_pretrained(demo_root / "glm-4-voice-decoder")
    assert decoder.num_tokens == demo_weights.NUM_AUDIO_TOKENS
    audio = synthesize(decoder, script["speech_values"][:20])
    assert audio.size > 0 and float(np.sqrt(np.mean(audio**2))) > 1e-3  # not silent
    assert torch.isfinite(torch.from_numpy(audio)).all()


def test_cli_writes_demo_weights(demo_root, capsys):
    assert demo_weights.main([str(demo_root)]) == 0  # already there: not rewritten
    assert str(demo_root) in capsys.readouterr().out


@pytest.mark.parametrize(
    "env",
    [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
    ids=["offline-mode", "unreachable-endpoint"],
)
def test_download_offline_gives_a_clear_message(tmp_path, env):
    """No network: huggingface_hub is pointed at nothing (offline mode, or a closed loopback port)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    full_env = {**os.environ, "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2", **env}
    full_env.pop("HF_TOKEN", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pipeline.weights.download import main; sys.exit(main(sys.argv[1:]))",
            "--dir",
            str(tmp_path / "w"),
        ],
        cwd=root,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "could not download THUDM/glm-4-voice-tokenizer" in proc.stderr
    assert "offline" in proc.stderr and "HF_ENDPOINT" in proc.stderr
    if "HF_ENDPOINT" in env:
        assert env["HF_ENDPOINT"] in proc.stderr  # the configured mirror is the one that was tried

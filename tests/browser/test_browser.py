"""A real browser calls the server: headless Debian chromium with a fake microphone
(tests/helpers/browser_call.py).

Runs inside a network namespace with only loopback (`unshare -n`, `ip link set lo up`) where the machine
allows it, else on the host's loopback; the test output says which. The screenshot is kept under artifacts/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"

pytestmark = [
    pytest.mark.browser,
]

# make test installs Debian chromium and espeak-ng; their absence is a failure, not a skip.
assert Path("/usr/bin/chromium").exists(), "Debian chromium is needed (make test installs it)"
assert shutil.which("espeak-ng"), "espeak-ng is needed (make test installs it)"


def _isolated_prefix() -> list[str]:
    """`unshare -n` with loopback up, if this machine lets us; [] otherwise."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return []
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
    return (
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"'] if probe.returncode == 0 else []
    )


def test_browser_call_end_to_end():
    pytest.importorskip("playwright")
    prefix = _isolated_prefix()
    mode = (
        "network namespace with loopback only (unshare -n)"
        if prefix
        else "host loopback (unshare not permitted)"
    )
    print(f"browser test network: {mode}")
    out = subprocess.run(
        [*prefix, sys.executable, str(ROOT / "tests" / "helpers" / "browser_call.py"), str(ARTIFACTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    stats = result["stats"]
    print(
        f"browser saw: state={stats['state']} inbound energy={stats['energy']:.3f} "
        f"packets={stats['packets']} "
        f"latency={result['latency']} screenshot={result['screenshot']}"
    )
    assert "input_audio_buffer.speech_started" in stats["types"], (
        "the server did not hear the fake microphone"
    )
    assert "input_audio_buffer.committed" in stats["types"]
    assert "Mic check: I heard" in result["transcript"]
    assert stats["packets"] > 50
    # Non-silent audio reached the browser: totalAudioEnergy integrates level^2 over seconds; our echoed
    # speech gives ~1, silence gives ~0.
    assert stats["energy"] > 0.05, f"the browser received silence (totalAudioEnergy {stats['energy']})"
    assert "output_audio_buffer.stopped" in stats["types"]
    assert result["latency"].endswith("ms")
    assert result["calls_after_hangup"] == 0, "Hang up did not free the call on the server"
    assert Path(result["screenshot"]).stat().st_size > 10_000


def test_browser_busy_and_auth_messages():
    pytest.importorskip("playwright")
    prefix = _isolated_prefix()
    out = subprocess.run(
        [*prefix, sys.executable, str(ROOT / "tests" / "helpers" / "browser_admission.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"browser admission: {result}")
    assert result["page_secret_call"]["connected"], result  # auth on, the page minted its own secret
    assert not result["busy"]["connected"] and result["busy"]["error"].startswith("Server busy, retry in 9 s")
    assert result["calls_on_busy_server"] == 1
    assert not result["no_secret"]["connected"] and "requires authorization" in result["no_secret"]["error"]
    assert result["fragment_secret_call"]["connected"], result  # the app backend's secret, via the fragment
    assert not result["fragment_left_in_url"] and result["calls_on_app_server"] == 1


def test_browser_conversation_history():
    """The page keeps the whole call as a conversation (static/history.js), across a reload, with the words
    of each spoken turn."""
    pytest.importorskip("playwright")
    from pipeline.weights.demo import MESSAGE

    prefix = _isolated_prefix()
    out = subprocess.run(
        [
            *prefix,
            sys.executable,
            str(ROOT / "tests" / "helpers" / "browser_call.py"),
            str(ARTIFACTS),
            "conversation",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"browser history: {r['dom']['text']!r} screenshot={r['screenshot']}")
    users = [t for t in r["turns"] if t["role"] == "user"]
    replies = [t for t in r["turns"] if t["role"] == "assistant"]
    assert [u["kind"] for u in users] == ["spoken", "spoken", "typed"] and users[2]["text"] == r["typed"]
    for user, spoken_s in zip(users[:2], r["spoken_s"], strict=True):
        assert abs(user["durationS"] - spoken_s) < 0.6, (user, spoken_s)
    # the words of each spoken turn (its transcript: babble from the demo Whisper) with the duration
    # beside them
    assert len(r["transcripts"]) == 2 and all(r["transcripts"])
    assert [u["words"] for u in users[:2]] == r["transcripts"] == r["dom"]["words"]
    assert r["dom"]["users"][:2] == [f"{u['words']} {u['durationS']:.1f} s" for u in users[:2]]
    assert len(replies) == 3 and [t["role"] for t in r["turns"]] == ["user", "assistant"] * 3
    assert [x["cutOff"] for x in replies] == [False, True, False]
    assert "".join(replies[0]["deltas"]) == MESSAGE == "".join(replies[2]["deltas"])
    cut = replies[1]
    assert 0 < cut["playedMs"] < 6000
    (shown,) = r["dom"]["cut"]
    assert shown["heard"] and shown["unheard"] and shown["heard"] + shown["unheard"] == "".join(cut["deltas"])
    assert (
        MESSAGE.startswith(shown["heard"]) and float(shown["unheardOpacity"]) < 1
    )  # the unheard rest dimmed
    assert len(r["dom"]["latencies"]) == 3 and all(x.endswith(" ms") for x in r["dom"]["latencies"])
    assert r["clipboard"] == r["as_text"] and "[cut off; unheard: " in r["clipboard"]
    assert r["after_reload"] == r["turns"]  # the history survives a reload
    assert r["after_new_call"][:-1] == r["turns"] and r["after_new_call"][-1]["role"] == "note"
    assert "starts fresh" in r["after_new_call"][-1]["text"]
    assert Path(r["screenshot"]).stat().st_size > 10_000

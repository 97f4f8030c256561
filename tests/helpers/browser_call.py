"""Real-browser calls: Debian chromium (headless, Playwright) with a fake microphone file. Run by
tests/browser/test_browser.py, inside a loopback-only network namespace where the machine allows it.
Prints one JSON line with what it saw.

    python tests/helpers/browser_call.py OUT_DIR                 # one spoken turn with the echo server
    python tests/helpers/browser_call.py OUT_DIR conversation    # the history: GLM demo weights, two
        spoken turns, a typed turn that cuts the second reply off, a reload, a new call
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from tests.helpers.rtc_client import start_server  # noqa: E402
from tests.helpers.speech import ENGLISH_SENTENCES, synth_speech, write_wav  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
STATS_JS = """async () => {
  const pc = window.glm4voice.pc; if (!pc) return null;
  let energy = 0, packets = 0;
  (await pc.getStats()).forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'audio') {
    energy = s.totalAudioEnergy || 0; packets = s.packetsReceived || 0; } });
  return {energy, packets, state: window.glm4voice.state, stats: window.glm4voice.stats,
          types: window.glm4voice.events.map((e) => e.type)};
}"""


async def main(out_dir: Path) -> dict:
    from playwright.async_api import async_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    mic = out_dir / "fake_mic.wav"
    speech = synth_speech(ENGLISH_SENTENCES[0])
    write_wav(
        mic, np.concatenate([np.zeros(8_000, np.float32), speech, np.zeros(12 * 16_000, np.float32)]), 16_000
    )  # no re-talk over the echo
    server = await start_server()
    result: dict = {"ok": False}
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=[
                    "--use-fake-ui-for-media-stream",
                    "--use-fake-device-for-media-stream",
                    f"--use-file-for-fake-audio-capture={mic}",
                    "--allow-loopback-in-peer-connection",
                    "--autoplay-policy=no-user-gesture-required",
                    "--no-sandbox",
                    "--headless",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            page = await browser.new_page(viewport={"width": 390, "height": 844})  # a phone-size screen
            console: list[str] = []
            page.on("console", lambda m: console.append(m.text))
            await page.goto(server.base_url + "/")
            await page.click("#call")
            t0 = time.monotonic()
            stats = None
            while time.monotonic() - t0 < 40:
                stats = await page.evaluate(STATS_JS)
                if stats and "output_audio_buffer.stopped" in stats["types"] and stats["energy"] > 0:
                    break
                await asyncio.sleep(0.25)
            await page.screenshot(path=str(out_dir / "browser_call.png"), full_page=True)
            transcript = await page.inner_text("#history")
            latency = await page.inner_text("#latency")
            await page.click("#call")  # hang up
            deadline = time.monotonic() + 5
            while server.server.calls and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            result = {
                "ok": True,
                "stats": stats,
                "transcript": transcript,
                "latency": latency,
                "calls_after_hangup": len(server.server.calls),
                "console": console[-20:],
                "screenshot": str(out_dir / "browser_call.png"),
            }
            await browser.close()
    finally:
        await server.runner.cleanup()
    return result


TYPED = "Stop please, a typed question."
TYPES_JS = "() => window.glm4voice.events.map((e) => e.type)"


async def _wait_types(page, kind: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (await page.evaluate(TYPES_JS)).count(kind) < count:
        if time.monotonic() > deadline:
            error = await page.inner_text("#error") if await page.is_visible("#error") else ""
            state = await page.evaluate("() => window.glm4voice.state")
            raise TimeoutError(
                f"fewer than {count} {kind} in {await page.evaluate(TYPES_JS)}; page error: {error!r}; "
                f"state {state}"
            )
        await asyncio.sleep(0.1)


async def conversation(out_dir: Path) -> dict:
    """Two spoken turns, a typed turn that interrupts the second reply, then a reload and a new call."""
    import tempfile

    from playwright.async_api import async_playwright

    from pipeline.engine.config import EngineConfig
    from pipeline.engine.thread import GLMVoiceResponder
    from pipeline.transcription.config import TranscriptionConfig
    from pipeline.weights.demo import ensure_demo_weights

    out_dir.mkdir(parents=True, exist_ok=True)
    speech = [synth_speech(ENGLISH_SENTENCES[0]), synth_speech("And what about the day after?")]
    mic = out_dir / "fake_mic_conversation.wav"
    gap = np.zeros(16 * 16_000, np.float32)  # a whole 6.24 s demo reply plays (slower on a busy CPU) first
    write_wav(
        mic,
        np.concatenate(
            [np.zeros(8_000, np.float32), speech[0], gap, speech[1], np.zeros(60 * 16_000, np.float32)]
        ),
        16_000,
    )  # chromium loops the file
    with tempfile.TemporaryDirectory() as tmp:
        demo = ensure_demo_weights(Path(tmp) / "demo")
        server = await start_server(
            GLMVoiceResponder(
                EngineConfig(demo_weights_dir=str(demo), device="cpu"),
                transcription=TranscriptionConfig(enabled="on"),  # the page asks for the user's words
            ),
            kind="glm4voice",
        )
        try:
            async with async_playwright() as p:
                browser = await p.chromium.launch(
                    executable_path=CHROMIUM,
                    headless=True,
                    args=[
                        "--use-fake-ui-for-media-stream",
                        "--use-fake-device-for-media-stream",
                        f"--use-file-for-fake-audio-capture={mic}",
                        "--allow-loopback-in-peer-connection",
                        "--autoplay-policy=no-user-gesture-required",
                        "--no-sandbox",
                        "--headless",
                        "--disable-gpu",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--disable-sync",
                        "--no-first-run",
                    ],
                )
                context = await browser.new_context(viewport={"width": 390, "height": 844})
                await context.grant_permissions(
                    ["microphone", "clipboard-read", "clipboard-write"], origin=server.base_url
                )
                page = await context.new_page()
                page.on("console", lambda m: print("console:", m.text, file=sys.stderr))
                page.on("pageerror", lambda e: print("pageerror:", e, file=sys.stderr))
                await page.goto(server.base_url + "/")
                await page.evaluate("() => localStorage.clear()")
                await page.reload()
                await page.click("#call")
                await _wait_types(page, "output_audio_buffer.started", 2, 60)
                await asyncio.sleep(3.0)  # part of the second reply plays, then the typed turn cuts it off
                await page.fill("#text", TYPED)
                await page.click("#send")
                await _wait_types(page, "glm4voice.response.cancelled", 1, 10)
                await _wait_types(page, "response.done", 3, 30)
                await _wait_types(page, "glm4voice.turn.latency", 3, 30)
                await _wait_types(page, "conversation.item.input_audio_transcription.completed", 2, 60)
                transcripts = await page.evaluate(
                    "() => window.glm4voice.events.filter((e) => e.type === "
                    "'conversation.item.input_audio_transcription.completed').map((e) => e.transcript)"
                )
                await page.screenshot(path=str(out_dir / "browser_history.png"), full_page=True)
                turns = await page.evaluate("() => window.glm4voiceHistory.turns()")
                dom = await page.evaluate("""() => ({
                  text: document.getElementById('history').innerText,
                  cut: [...document.querySelectorAll('#history li.assistant.cut')].map((li) => ({
                    heard: li.querySelector('.heard').textContent,
                    unheard: li.querySelector('.unheard').textContent,
                    unheardOpacity: getComputedStyle(li.querySelector('.unheard')).opacity})),
                  latencies: [...document.querySelectorAll('#history li.assistant .latency')]
                    .map((e) => e.textContent),
                  users: [...document.querySelectorAll('#history li.user')].map((e) => e.textContent),
                  words: [...document.querySelectorAll('#history li.user .words')]
                    .map((e) => e.textContent)})""")
                await page.click("#copy-history")
                clipboard = await page.evaluate("() => navigator.clipboard.readText()")
                as_text = await page.evaluate("() => window.glm4voiceHistory.asText()")
                await page.click("#call")  # hang up
                await page.reload()
                after_reload = await page.evaluate("() => window.glm4voiceHistory.turns()")
                await page.click("#call")  # a new call
                await _wait_types(page, "session.created", 1, 20)
                after_new_call = await page.evaluate("() => window.glm4voiceHistory.turns()")
                await page.click("#call")
                await browser.close()
        finally:
            await server.runner.cleanup()
    return {
        "turns": turns,
        "dom": dom,
        "clipboard": clipboard,
        "as_text": as_text,
        "after_reload": after_reload,
        "after_new_call": after_new_call,
        "typed": TYPED,
        "transcripts": transcripts,
        "spoken_s": [x.size / 16_000 for x in speech],
        "screenshot": str(out_dir / "browser_history.png"),
    }


if __name__ == "__main__":
    run = conversation if sys.argv[2:] == ["conversation"] else main
    print(json.dumps(asyncio.run(run(Path(sys.argv[1])))))

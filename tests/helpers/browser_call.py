"""One real-browser call: Debian chromium (headless, Playwright) with a fake microphone file calls an
in-process echo server. Run by tests/test_browser.py, inside a loopback-only network namespace where
the machine allows it. Prints one JSON line with what it saw.

    python tests/helpers/browser_call.py OUT_DIR
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
    write_wav(mic, np.concatenate([np.zeros(8_000, np.float32), speech, np.zeros(12 * 16_000, np.float32)]), 16_000)  # no re-talk over the echo
    server = await start_server()
    result: dict = {"ok": False}
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={mic}", "--allow-loopback-in-peer-connection",
                "--autoplay-policy=no-user-gesture-required", "--no-sandbox", "--headless", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run"])
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
            transcript = await page.inner_text("#transcript")
            latency = await page.inner_text("#latency")
            await page.click("#call")  # hang up
            deadline = time.monotonic() + 5
            while server.server.calls and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            result = {"ok": True, "stats": stats, "transcript": transcript, "latency": latency,
                      "calls_after_hangup": len(server.server.calls), "console": console[-20:],
                      "screenshot": str(out_dir / "browser_call.png")}
            await browser.close()
    finally:
        await server.runner.cleanup()
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))))

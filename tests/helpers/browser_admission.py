"""The page under admission and auth, in real headless chromium (run by tests/browser/test_browser.py): a busy
server shows "Server busy, retry in N s"; with auth on, the page mints its own client secret where
`[auth] page_secrets` allows it, uses a secret handed over in the URL fragment otherwise, and says
what is missing when it has neither. Prints one JSON line with what each page showed.

    python tests/helpers/browser_admission.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from tests.helpers.rtc_client import start_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
API_KEY = "browser-test-key-0123456789"


async def _call(page, url: str, timeout_s: float = 15.0) -> dict:
    """Open `url`, press Call, wait until the call is up or an error shows."""
    await page.goto(url)
    await page.click("#call")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        state = await page.evaluate(
            "() => ({state: window.glm4voice.state, types: window.glm4voice.events.map((e) => e.type)})"
        )
        if "session.created" in state["types"] or state["state"] == "error":
            break
        await asyncio.sleep(0.1)
    error = await page.inner_text("#error") if await page.is_visible("#error") else ""
    return {"state": state["state"], "connected": "session.created" in state["types"], "error": error}


async def main() -> dict:
    from playwright.async_api import async_playwright

    open_page = await start_server(
        overrides={
            "auth": {"api_key": API_KEY, "page_secrets": True},
            "limits": {"max_calls": 1, "retry_after_s": 9},
        }
    )
    app_only = await start_server(overrides={"auth": {"api_key": API_KEY}})
    result: dict = {}
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=[
                    "--use-fake-ui-for-media-stream",
                    "--use-fake-device-for-media-stream",
                    "--allow-loopback-in-peer-connection",
                    "--no-sandbox",
                    "--headless",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--no-first-run",
                ],
            )
            first, second = await browser.new_page(), await browser.new_page()
            result["page_secret_call"] = await _call(first, open_page.base_url + "/")
            result["busy"] = await _call(second, open_page.base_url + "/")
            result["calls_on_busy_server"] = len(open_page.server.calls)
            third = await browser.new_page()
            result["no_secret"] = await _call(third, app_only.base_url + "/")
            async with aiohttp.ClientSession() as http:  # what an app backend holding the key does
                async with http.post(
                    app_only.base_url + "/v1/realtime/client_secrets",
                    json={},
                    headers={"Authorization": f"Bearer {API_KEY}"},
                ) as r:
                    secret = (await r.json())["value"]
            fourth = await browser.new_page()
            result["fragment_secret_call"] = await _call(
                fourth, app_only.base_url + f"/#client_secret={secret}"
            )
            result["fragment_left_in_url"] = secret in fourth.url
            result["calls_on_app_server"] = len(app_only.server.calls)
            await browser.close()
    finally:
        await open_page.runner.cleanup()
        await app_only.runner.cleanup()
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))

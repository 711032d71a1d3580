"""Open the page of a running `mmtag serve` in headless Chromium, tag a real photo through it as
a user would (choose the file, type the caption, press Tag), and save a screenshot.

    python tools/page_check.py --url http://127.0.0.1:8000 --image PHOTO.jpg \
        --caption "A man riding a bike" --out page.png

It drives the browser over the Chrome DevTools Protocol (the `websockets` package, a dev
dependency); Chromium itself comes from Debian (`apt-get install chromium`). Prints the labels
the page shows, as JSON; exits 1 if the page shows an error or no result.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no Chromium found: apt-get install chromium (Debian's package)")


class Tab:
    """One page over the DevTools websocket: send a command, get its result."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        res = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                              returnByValue=True)
        return res.get("result", {}).get("value")


async def drive(ws_url: str, url: str, image: Path, caption: str, out: Path,
                height: int) -> dict:
    import websockets

    async with websockets.connect(ws_url, max_size=2**26) as ws:
        tab = Tab(ws)
        await tab.call("Emulation.setDeviceMetricsOverride", width=1100, height=height,
                       deviceScaleFactor=1, mobile=False)
        await tab.call("Page.enable")
        await tab.call("Page.navigate", url=url)
        for _ in range(100):  # until the page has loaded the model description
            if await tab.js("document.getElementById('model')?.textContent || ''"):
                break
            await asyncio.sleep(0.1)
        doc = await tab.call("DOM.getDocument")
        node = await tab.call("DOM.querySelector", nodeId=doc["root"]["nodeId"],
                              selector="#image")
        await tab.call("DOM.setFileInputFiles", files=[str(image.resolve())],
                       nodeId=node["nodeId"])
        await tab.js("document.getElementById('image').dispatchEvent(new Event('change'))")
        await tab.js(f"document.getElementById('caption').value = {json.dumps(caption)}")
        await tab.js("document.getElementById('go').click()")
        state = {}
        for _ in range(300):  # until the bars or an error appear
            state = await tab.js("""({rows: document.querySelectorAll('.row').length,
                labels: document.querySelector('.labels')?.textContent || null,
                error: document.getElementById('error').textContent,
                model: document.getElementById('model').textContent,
                preview: document.getElementById('preview').naturalWidth})""")
            if state["rows"] or state["error"]:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # let the preview image paint
        shot = await tab.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        return state


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--caption", default="")
    p.add_argument("--out", type=Path, default=Path("page.png"))
    p.add_argument("--height", type=int, default=900)
    args = p.parse_args()
    port = 9300 + (int(time.time()) % 500)
    with tempfile.TemporaryDirectory() as profile:
        chrome = subprocess.Popen(
            [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    targets = httpx.get(f"http://127.0.0.1:{port}/json", timeout=2).json()
                    pages = [t for t in targets if t.get("type") == "page"]
                    if pages:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            else:
                raise SystemExit("Chromium did not open its DevTools port")
            state = asyncio.run(drive(pages[0]["webSocketDebuggerUrl"], args.url, args.image,
                                      args.caption, args.out, args.height))
        finally:
            chrome.terminate()
            chrome.wait(10)
    print(json.dumps({**state, "screenshot": str(args.out)}))
    return 0 if state.get("rows") and not state.get("error") else 1


if __name__ == "__main__":
    raise SystemExit(main())

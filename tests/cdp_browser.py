"""Drive headless Chromium over the DevTools protocol (aiohttp's WebSocket; no extra package):
open a page, collect console errors, exceptions and every network request, evaluate
expressions, take a full-page screenshot."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def chromium_path() -> str | None:
    return CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")


@dataclass
class PageReport:
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


async def inspect_page(
    url: str, expressions: dict[str, str], screenshot: Path, width: int = 1400
) -> PageReport:
    exe = chromium_path()
    assert exe, "chromium is not installed (make browser installs it)"
    profile = tempfile.mkdtemp(prefix="replay-cdp-")
    proc = subprocess.Popen(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-background-networking", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            assert time.monotonic() < deadline and proc.poll() is None, "chromium did not start"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t["type"] == "page"]
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                return await _drive(ws, url, expressions, screenshot, width)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def _drive(ws: Any, url: str, expressions: dict[str, str], shot: Path, width: int) -> PageReport:
    rep = PageReport()
    ids = itertools.count(1)
    waiting: dict[int, asyncio.Future[Any]] = {}
    loaded = asyncio.Event()

    async def reader() -> None:
        async for msg in ws:
            data = msg.json()
            if "id" in data and data["id"] in waiting:
                waiting.pop(data["id"]).set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                rep.console_errors.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                )
            elif method == "Runtime.exceptionThrown":
                rep.console_errors.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                rep.console_errors.append(params["entry"]["text"])
            elif method == "Network.requestWillBeSent":
                rep.requests.append(params["request"]["url"])
            elif method == "Network.loadingFailed":
                rep.failed.append(params.get("errorText", "failed"))
            elif method == "Page.loadEventFired":
                loaded.set()

    async def call(method: str, **params: Any) -> dict[str, Any]:
        i = next(ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiting[i] = fut
        await ws.send_json({"id": i, "method": method, "params": params})
        res = await asyncio.wait_for(fut, 30)
        assert "error" not in res, res
        return res.get("result", {})

    task = asyncio.ensure_future(reader())
    try:
        for domain in ("Runtime", "Log", "Network", "Page"):
            await call(f"{domain}.enable")
        await call(
            "Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False
        )
        await call("Page.navigate", url=url)
        await asyncio.wait_for(loaded.wait(), 30)
        await asyncio.sleep(0.3)  # late console messages
        for name, expr in expressions.items():
            res = await call("Runtime.evaluate", expression=expr, returnByValue=True)
            rep.values[name] = res["result"].get("value")
        height = (
            await call("Runtime.evaluate", expression="document.body.scrollHeight", returnByValue=True)
        )["result"]["value"]
        await call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=int(height),
            deviceScaleFactor=1,
            mobile=False,
        )
        png = await call("Page.captureScreenshot", format="png")
        shot.write_bytes(base64.b64decode(png["data"]))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return rep

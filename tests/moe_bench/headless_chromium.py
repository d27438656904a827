"""Open a page in headless Chromium and report every request it made, and a screenshot.

Talks the DevTools protocol over `--remote-debugging-pipe` (fd 3: commands in, fd 4: replies
out, messages separated by NUL bytes), so only the standard library is needed. Network events
name every URL the page asked for and every load that failed, file:// ones included.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, NamedTuple

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
)


class PageLoad(NamedTuple):
    requested: list[str]  # every URL the page requested, in order
    failed: list[str]  # "url: net::ERR_..." for each request that failed
    screenshot_png: bytes


def executable() -> str | None:
    return shutil.which("chromium")


def open_page(url: str, profile_dir: Path, width: int = 1280, height: int = 2000) -> PageLoad:
    """Load `url`, wait for its load event, screenshot the viewport, close the browser."""
    commands_r, commands_w = os.pipe()
    replies_r, replies_w = os.pipe()

    def wire_pipes() -> None:  # in the child: its fd 3 reads commands, fd 4 writes replies
        ours = os.dup(commands_r), os.dup(replies_w)
        for fd, target in zip(ours, (3, 4)):
            os.dup2(fd, target)
            os.set_inheritable(target, True)

    args = [
        executable(),
        *FLAGS,
        f"--user-data-dir={profile_dir}",
        f"--window-size={width},{height}",
    ]
    browser = subprocess.Popen(
        [*args, "about:blank"],
        preexec_fn=wire_pipes,
        close_fds=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(commands_r)
    os.close(replies_w)
    session = _Session(commands_w, replies_r, deadline=time.monotonic() + 60)
    try:
        target = session.call("Target.createTarget", url="about:blank")["targetId"]
        page = session.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        session.call("Network.enable", page)
        session.call("Page.enable", page)
        session.call("Page.navigate", page, url=url)
        session.wait_for("Page.loadEventFired")
        shot = session.call("Page.captureScreenshot", page, format="png")
        session.call("Browser.close")
        browser.wait(timeout=30)
    finally:
        if browser.poll() is None:
            browser.kill()
            browser.wait()
        os.close(commands_w)
        os.close(replies_r)
    sent = [e["params"] for e in session.events if e.get("method") == "Network.requestWillBeSent"]
    urls = {p["requestId"]: p["request"]["url"] for p in sent}
    failed = [
        f"{urls.get(e['params']['requestId'], '?')}: {e['params']['errorText']}"
        for e in session.events
        if e.get("method") == "Network.loadingFailed"
    ]
    return PageLoad([p["request"]["url"] for p in sent], failed, base64.b64decode(shot["data"]))


class _Session:
    def __init__(self, write_fd: int, read_fd: int, deadline: float) -> None:
        self.write_fd, self.read_fd, self.deadline = write_fd, read_fd, deadline
        self.events: list[dict[str, Any]] = []
        self.buffer = b""
        self.last_id = 0

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._receive())

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            ready, _, _ = select.select([self.read_fd], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError("headless chromium did not answer within 60 s")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("headless chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

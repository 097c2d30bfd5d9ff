"""A headless Chromium driven through chromedriver's W3C WebDriver API (plain HTTP, no client
library): what the MLflow UI tests use to load pages as a user's browser does, read what they
show, and save screenshots. Debian's `chromium` and `chromium-driver` (`.ci/run` installs them)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing() -> str | None:
    """Why no browser can start here, or None."""
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install chromium chromium-driver)"
    return None


class Browser:
    """One headless Chromium session. Use as a context manager: it stops what it started."""

    def __init__(self, width: int = 1600, height: int = 1000):
        self.port = free_port()
        self.driver = subprocess.Popen(
            ["chromedriver", f"--port={self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while True:
            try:
                self._call("GET", "/status")
                break
            except OSError:
                if time.time() > deadline:
                    self.driver.kill()
                    raise
                time.sleep(0.2)
        caps = {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": shutil.which("chromium"),
                "args": [
                    "--headless=new",
                    "--no-sandbox",  # root in a container
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    f"--window-size={width},{height}",
                ],
            },
        }
        session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        self.session = f"/session/{session['sessionId']}"

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._call("DELETE", self.session)
        except OSError:
            pass
        self.driver.terminate()
        try:
            self.driver.wait(10)
        except subprocess.TimeoutExpired:
            self.driver.kill()

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"webdriver {method} {path}: {err.read().decode()[:500]}") from None

    def get(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def run(self, script: str, *args):
        """The value of ``script`` (a function body: `return ...`) in the current frame."""
        return self._call("POST", f"{self.session}/execute/sync", {"script": script, "args": args})

    def text(self) -> str:
        return self.run("return document.body ? document.body.innerText : '';")

    def wait_for(self, predicate, timeout: float = 60, what: str = "the page"):
        """Poll ``predicate(self)`` until it returns something truthy."""
        deadline = time.time() + timeout
        while True:
            value = predicate(self)
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; it shows:\n{self.text()[:3000]}"
                )
            time.sleep(0.5)

    def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        def shown(b: Browser) -> str | None:
            text = b.text()
            return text if all(n in text for n in needles) else None

        return self.wait_for(shown, timeout, what=" and ".join(repr(n) for n in needles))

    def enter_frame(self, css: str) -> None:
        element = self._call(
            "POST", f"{self.session}/element", {"using": "css selector", "value": css}
        )
        self._call("POST", f"{self.session}/frame", {"id": element})

    def leave_frames(self) -> None:
        self._call("POST", f"{self.session}/frame", {"id": None})

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._call("GET", f"{self.session}/screenshot")))
        return path

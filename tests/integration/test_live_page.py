"""The live page (GET / and GET /ui) in a real headless Chromium, driven over the DevTools
protocol with the `websockets` package (a Sanic dependency): the page lists a symbol published
during the test and its numbers update as more batches arrive.

Chromium is Debian's `chromium` package (`.ci/run` installs it); without /usr/bin/chromium the
browser test is skipped with that reason. The page's HTTP answers are checked without it.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_harness import Server

from tests.waiting import wait_until

CHROMIUM = Path("/usr/bin/chromium")


def get_page(server: Server, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/", "/ui", "/ui/"])
def test_the_page_is_one_self_contained_html_file(server: Server, path: str) -> None:
    status, content_type, html = get_page(server, path)
    assert status == 200 and content_type.startswith("text/html")
    assert "<script>" in html and "/stream?symbols=" in html and "/symbols" in html
    # Nothing is fetched from elsewhere: no external script, style, font or image.
    for marker in ("http://", "https://", "src=", "<link"):
        assert marker not in html.replace("http://www.w3.org/2000/svg", ""), marker


class DevTools:
    """A Chrome DevTools Protocol connection to the browser, with one page session."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.session: str | None = None

    def call(self, method: str, params: dict | None = None, session: bool = True) -> Any:
        message: dict[str, Any] = {"id": next(self.ids), "method": method,
                                   "params": params or {}}  # fmt: skip
        if session and self.session is not None:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:  # events (no id) and other answers are skipped
            reply = json.loads(self.ws.recv(timeout=15))
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.call(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )["sessionId"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    if not CHROMIUM.exists():
        reason = "/usr/bin/chromium is absent (apt-get install -y chromium; .ci/run does)"
        if os.environ.get("HFT_REQUIRE_BROWSER") == "1":  # CI: never skip into green
            pytest.fail(reason)
        pytest.skip(reason)
    profile = tmp_path / "profile"
    with (tmp_path / "chromium.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "about:blank"],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        wait_until(
            lambda: port_file.exists() and len(port_file.read_text().splitlines()) >= 2,
            "Chromium's DevToolsActivePort",
            timeout_s=30,
        )
        port, path = port_file.read_text().splitlines()[:2]
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=10) as ws:
            yield DevTools(ws)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the browser and the helpers it started
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def read_row(devtools: DevTools, symbol: str) -> dict | None:
    """The row of `symbol` as the page shows it (None while it is not listed)."""
    return devtools.evaluate(
        f"""(() => {{
          const tr = document.querySelector('tr[data-symbol="' + CSS.escape({json.dumps(symbol)})
                                            + '"]');
          if (!tr) return null;
          const f = (n) => tr.querySelector('[data-field="' + n + '"]').textContent;
          return {{last: f("last"), count: f("count"), updates: Number(tr.dataset.updates || 0),
                   status: document.getElementById("status").dataset.state}};
        }})()"""
    )


def test_the_page_shows_a_symbol_and_its_numbers_update(server: Server, browser) -> None:
    symbol = f"PAGE-{uuid.uuid4().hex[:8]}"
    browser.open(f"http://127.0.0.1:{server.port}/ui")
    wait_until(lambda: browser.evaluate("document.readyState") == "complete", "the page")
    assert server.post_batch(symbol, [4.0, 6.0]).status == 200  # published while it is open
    wait_until(lambda: (read_row(browser, symbol) or {}).get("last") == "6", "the symbol's row", 20)
    first = read_row(browser, symbol)
    assert first["count"] == "2" and first["updates"] >= 1 and first["status"] == "open"

    assert server.post_batch(symbol, [1.0, 2.0, 9.5]).status == 200
    wait_until(lambda: read_row(browser, symbol)["last"] == "9.5", "the update", 20)
    second = read_row(browser, symbol)
    assert second["count"] == "5" and second["updates"] > first["updates"]
    assert (first["last"], first["count"]) != (second["last"], second["count"])
    stats = server.stats(symbol, 3).json  # the page's window: 10^3
    assert float(second["last"]) == stats["last"]
    assert float(browser.evaluate(_field(symbol, "max"))) == stats["max"]
    assert float(browser.evaluate(_field(symbol, "avg"))) == pytest.approx(stats["avg"])


def _field(symbol: str, name: str) -> str:
    return (
        f"document.querySelector('tr[data-symbol=\"' + CSS.escape({json.dumps(symbol)}) + "
        f'\'"] [data-field="{name}"]\').textContent'
    )

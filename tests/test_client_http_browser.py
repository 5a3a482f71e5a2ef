"""The browser client (broker/static/broker.js) over HTTP, in Chromium.

Two of its promises that rest on broker extensions to the HTTP API:

* a session deleted and created again under a reader is a ``reset`` with the
  real new epoch (``Broker-Epoch``), on SSE and long-poll, even when the new
  session is long enough for the reader's offset;
* a publish sent on the WebSocket whose answer is lost, and resent over HTTP
  after the page fell back to SSE, is stored once and resolves to its offset
  (``Broker-Client`` names the producer's owner as the WebSocket did).

A real ``broker serve`` runs as a child process per test; the page is any
page of the broker's origin, which imports ``/client/broker.js`` and drives it
with ``page.evaluate``.  Waits are bounded and generous, never assertions of
speed.  Without Chromium or the playwright package the module is skipped.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _chromium import WAIT_MS, launch, require
from _proxy import ThreadedProxy
from _serveproc import serving

sync_api = require()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch(sync_api)


@pytest.fixture
def port(tmp_path: Path) -> Iterator[int]:
    with serving(tmp_path / "data") as (_, port):
        yield port


def call(port: int, method: str, name: str, body: bytes | None = None) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/stream/{name}", data=body,
                                 method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as res:
        return res.headers


def stored(port: int, name: str) -> list[Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stream/{name}?offset=-1",
                                timeout=30) as res:
        return list(json.loads(res.read()))


def open_client(browser: Any, base: str, options: dict[str, Any]) -> Any:
    page = browser.new_context().new_page()
    page.goto(f"{base}/client/broker.js")
    page.evaluate("""async (options) => {
        const { connect } = await import("/client/broker.js");
        window.got = []; window.resets = [];
        window.c = connect(options);
        c.on("record", (r) => got.push([r.offset, r.data]));
        c.on("reset", (e) => resets.push(e.epoch));
    }""", options)
    return page


@pytest.mark.parametrize("transport", ["sse", "longpoll"])
def test_a_recreated_session_is_a_reset_with_its_epoch(browser: Any, port: int,
                                                       transport: str) -> None:
    call(port, "PUT", "e", b"[1,2]")
    first = int(call(port, "HEAD", "e")["Broker-Epoch"])
    page = open_client(browser, f"http://127.0.0.1:{port}",
                       {"session": "e", "transports": [transport], "offset": -1,
                        "storageKey": f"e-{transport}"})
    page.wait_for_function("window.got.length >= 2", timeout=WAIT_MS)
    assert page.evaluate("window.c.epoch") == first
    call(port, "DELETE", "e")
    call(port, "PUT", "e", b"[10,20,30]")          # longer than what the page read
    second = int(call(port, "HEAD", "e")["Broker-Epoch"])
    assert second != first
    page.wait_for_function("window.got.length >= 5", timeout=WAIT_MS)
    assert page.evaluate("window.got") == [[0, 1], [1, 2], [0, 10], [1, 20], [2, 30]]
    assert page.evaluate("window.resets") == [second]
    assert page.evaluate("window.c.epoch") == second
    page.context.close()


def test_a_publish_resent_over_http_after_a_fallback_is_stored_once(browser: Any,
                                                                    port: int) -> None:
    with ThreadedProxy.running(port) as proxy:
        page = open_client(browser, f"http://127.0.0.1:{proxy.port}",
                           {"session": "w", "create": True, "offset": -1, "storageKey": "w"})
        page.wait_for_function("window.c.state === 'connected' && window.c.transport === 'ws'",
                               timeout=WAIT_MS)
        assert page.evaluate("window.c.publish({n: 0})") == 0
        proxy.set(swallow="to_client")
        page.evaluate("() => { window.res = undefined; c.publish({n: 1}).then((o) => { window.res = o; }); }")
        for _ in range(600):
            if len(stored(port, "w")) == 2:              # stored; its answer is lost
                break
            page.wait_for_timeout(50)
        assert len(stored(port, "w")) == 2
        proxy.cut(swallow=None, refuse_upgrades=True)
        page.wait_for_function("window.res !== undefined", timeout=WAIT_MS)
        assert page.evaluate("window.res") == 1
        assert page.evaluate("window.c.transport") == "sse"
        assert stored(port, "w") == [{"n": 0}, {"n": 1}]
        assert proxy.get("upgrades_refused") >= 2
        page.context.close()

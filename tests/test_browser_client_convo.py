"""broker.js with ``conversation: true``, in Chromium, on every transport.

The client starts from a view (a WebSocket ``view`` frame, or
``?view=conversation`` over SSE and long-poll) and folds the records after
it; its signals (``cancel``, ``approve``, ``input``) and messages follow the
model's meta and payload rule (docs/ai.md).  The page's fold must end where
the Python fold of the session, read over HTTP, ends, in a JSON session and
in a binary one; and a page that comes late gets one view and (next to) no
records.  A real ``broker serve`` runs per test; without Chromium or the
playwright package the module is skipped.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from _chromium import WAIT_MS, launch, require
from _serveproc import serving
from broker._convo import Conversation, Encoder

sync_api = require()

RECORDS = "application/vnd.broker.records+msgpack"
TYPES = {"json": "application/json", "binary": "application/octet-stream"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch(sync_api)


@pytest.fixture
def port(tmp_path: Path) -> Iterator[int]:
    with serving(tmp_path / "data") as (_, port):
        yield port


def http(port: int, method: str, name: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/stream/{name}", data=body,
                                 method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as res:
        return res.read()


def publish(port: int, name: str, content_type: str, drafts: list[Any]) -> None:
    """Each draft as one POST, as an agent over HTTP would (a binary one as a
    msgpack records body, which may be empty, as a start's often is)."""
    for d in drafts:
        if content_type == TYPES["json"]:
            body = b"[" + d.payload + b"]"
        else:
            body, content_type = msgpack.packb([d.payload]), RECORDS
        http(port, "POST", name, body, {"content-type": content_type,
                                        "broker-kind": str(d.kind),
                                        "broker-meta": json.dumps([d.meta])})


def folded(port: int, name: str, json_session: bool) -> dict[str, Any]:
    conv = Conversation(json=json_session)
    for r in json.loads(http(port, "GET", f"{name}?offset=-1&view=records")):
        conv.apply_view_record(r)
    snap: dict[str, Any] = json.loads(json.dumps(conv.to_snapshot(text=True)))
    return snap


def open_client(browser: Any, port: int, options: dict[str, Any]) -> Any:
    page = browser.new_context().new_page()
    page.goto(f"http://127.0.0.1:{port}/client/broker.js")
    page.evaluate("""async (options) => {
        const { connect } = await import("/client/broker.js");
        window.c = connect({ conversation: true, ...options });
    }""", options)
    page.wait_for_function("window.c.state === 'connected' && window.c.stats.views > 0",
                           timeout=WAIT_MS)
    return page


def page_snapshot(page: Any) -> Any:
    return page.evaluate("window.c.conversation.toSnapshot()")


@pytest.mark.parametrize("transport", ["ws", "sse", "longpoll"])
@pytest.mark.parametrize("session_type", ["json", "binary"])
def test_the_page_folds_what_python_folds(browser: Any, port: int, transport: str,
                                          session_type: str) -> None:
    name, ct = f"c/{transport}-{session_type}", TYPES[session_type]
    is_json = session_type == "json"
    http(port, "PUT", name, headers={"content-type": ct})
    enc = Encoder(json=is_json)
    publish(port, name, ct, [enc.message("u_0", "user", "before the page")])
    options = {"session": name, "transports": [transport], "contentType": ct,
               "storageKey": name}
    page = open_client(browser, port, options)
    assert page.evaluate("window.c.conversation.messages.length") == 1

    page.evaluate("c.message('h\u00e9llo \u2603', { id: 'u_\u00e9' })")
    tokens = [f"tok{i} \u00e9 " for i in range(30)]
    publish(port, name, ct, [enc.start("m_1", "assistant", reply_to="u_\u00e9"),
                             *[enc.delta("m_1", t) for t in tokens], enc.end("m_1", "end."),
                             enc.tool_call("t_1", "send", {"to": "\u00e9"}, approval=True,
                                           message="m_1")])
    page.wait_for_function("window.c.conversation.pendingApprovals.length === 1",
                           timeout=WAIT_MS)
    page.evaluate("c.approve('t_1', true, 'fine \u2713')")
    page.evaluate("c.input('more \u2713', { ref: 'm_1' })")
    page.evaluate("c.cancel()")
    page.wait_for_function("window.c.conversation.signals.length === 3", timeout=WAIT_MS)

    snap = page_snapshot(page)
    assert snap == folded(port, name, is_json)
    view = Conversation.from_snapshot(snap).view()
    assert view.messages[1].text == "h\u00e9llo \u2603"
    assert view.messages[2].text == "".join(tokens) + "end."
    call = view.tool_calls[0]
    assert (call.approved, json.loads(call.args)) == (True, {"to": "\u00e9"})
    assert [(s.type, s.ref, s.target, s.text) for s in view.signals] == [
        ("approve", "t_1", "tool_call", "fine \u2713"), ("input", "m_1", "message", "more \u2713"),
        ("cancel", None, "run", "")]
    assert call.cancel == view.signals[2].offset
    assert view.anomalies == ()

    # A page that comes now gets the same conversation, from one view.
    late = open_client(browser, port, {**options, "storageKey": name + "-late"})
    assert page_snapshot(late) == snap
    stats = late.evaluate("window.c.stats")
    assert stats["views"] == 1 and stats["records"] == 0
    assert page.evaluate("window.c.stats.records") >= len(tokens)
    page.context.close()
    late.context.close()


@pytest.mark.parametrize("transport", ["sse", "longpoll"])
def test_a_recreated_session_starts_from_a_new_view(browser: Any, port: int,
                                                    transport: str) -> None:
    """(On the WebSocket a deleted session ends the client: ``deleted``.)"""
    ct = TYPES["json"]
    http(port, "PUT", "r", headers={"content-type": ct})
    enc = Encoder(json=True)
    publish(port, "r", ct, [enc.message("u_1", "user", "old")])
    page = open_client(browser, port, {"session": "r", "transports": [transport],
                                       "storageKey": "r"})
    http(port, "DELETE", "r")
    http(port, "PUT", "r", headers={"content-type": ct})
    publish(port, "r", ct, [enc.message("u_2", "user", "new")])
    page.wait_for_function("window.c.stats.views === 2 && window.c.conversation.item('u_2')",
                           timeout=WAIT_MS)
    assert [m["id"] for m in page.evaluate("window.c.conversation.messages")] == ["u_2"]
    page.context.close()

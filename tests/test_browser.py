"""The browser client (broker/static/broker.js) and the demo page, in Chromium.

A real ``broker serve --demo`` runs as a subprocess for the whole module; its
simulated agent answers every user message in a ``demo/<room>`` session (a
streamed reply, a tool call, a tool call waiting for approval, a final
message), in the AI message model of docs/ai.md.  Each test drives the page
at ``/demo?room=<room>`` with Playwright, sometimes through ``_proxy`` (which
cuts, idles out or refuses WebSocket upgrades), and then checks what the
page shows against the session itself, read over HTTP with ``view=records``
and folded in Python: every assistant message's text must equal the fold's,
and after its latest view the page must have received offsets N, N+1, ...
with no gap and no repeat.  The page's fold appends deltas as they come and
never de-duplicates them, so a lost or repeated record shows.

Waits are bounded and generous; nothing asserts how long anything took.
Chromium is /usr/bin/chromium (installed by .ci/run); without it, or
without the playwright package, the module is skipped.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from _chromium import WAIT_MS, launch, require
from _proxy import ThreadedProxy
from broker._convo import Conversation

sync_api = require()


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("browser")
    log = tmp / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--demo", "--port", "0",
             "--data-dir", str(tmp / "data")], stdout=subprocess.DEVNULL, stderr=err)
    try:
        found = 0
        deadline = time.monotonic() + 30
        while not found and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
            found = int(m.group(1)) if m else 0
            time.sleep(0.05)
        assert found, f"broker serve did not start: {log.read_text()}"
        yield found
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch(sync_api)


@pytest.fixture
def room() -> str:
    return secrets.token_hex(4)


# ------------------------------------------------------------------ helpers

def records(port: int, room: str) -> list[dict[str, Any]]:
    """Every record of demo/<room>, read over HTTP with view=records."""
    out: list[dict[str, Any]] = []
    offset = "-1"
    while True:
        url = f"http://127.0.0.1:{port}/v1/stream/demo/{room}?offset={offset}&view=records"
        with urllib.request.urlopen(url, timeout=30) as res:
            out.extend(json.loads(res.read()))
            offset = res.headers["Stream-Next-Offset"]
            if res.headers.get("Stream-Up-To-Date") == "true":
                return out


def fold(recs: list[dict[str, Any]]) -> Conversation:
    conv = Conversation(json=True)
    for r in recs:
        conv.apply_view_record(r)
    return conv


def answers(conv: Conversation) -> dict[str, str]:
    """Each finished assistant message: id -> its text."""
    return {m.id: m.text for m in conv.view().messages
            if m.role == "assistant" and not m.open}


def open_demo(context: Any, base: str, room: str, extra: str = "") -> Any:
    page = context.new_page()
    page.goto(f"{base}/demo?room={room}{extra}")
    page.wait_for_selector("#status[data-state=connected]", timeout=WAIT_MS)
    return page


def say(page: Any, text: str) -> None:
    page.fill("#box", text)
    page.press("#box", "Enter")


def wait_done(page: Any, n: int) -> None:
    """Until n assistant messages are complete on the page."""
    page.wait_for_function(
        "n => document.querySelectorAll('.msg.assistant[data-done=true]').length >= n",
        arg=n, timeout=WAIT_MS)


def approve(page: Any) -> None:
    page.click("button[data-approve]:not([disabled])", timeout=WAIT_MS)


def shown(page: Any) -> dict[str, Any]:
    got: dict[str, Any] = page.evaluate("""() => ({
        answers: Object.fromEntries([...document.querySelectorAll('.msg.assistant')]
            .map(m => [m.dataset.id, m.querySelector('.text').textContent])),
        assistant: document.querySelectorAll('.msg.assistant').length,
        users: [...document.querySelectorAll('.msg.user')].map(m => m.textContent),
        approvals: [...document.querySelectorAll('[data-kind=approval]')]
            .map(c => c.dataset.decision || null),
        offsets: window.brokerDemo.offsets,
        views: window.brokerDemo.views,
        transport: document.getElementById('status').dataset.transport,
    })""")
    return got


def check_page(page: Any, port: int, room: str, *, users: int = 1) -> dict[str, Any]:
    """The page shows exactly what the session holds: each finished answer once
    and whole, and it read every offset from 0 once."""
    conv = fold(records(port, room))
    expected = answers(conv)
    got = shown(page)
    assert expected, "the agent finished no message"
    for mid, text in expected.items():
        assert got["answers"].get(mid) == text
    assert got["assistant"] == len([m for m in conv.view().messages if m.role == "assistant"])
    assert len(got["users"]) == users
    assert got["views"], "the page starts from a view"
    offsets, start = got["offsets"], got["views"][-1]
    assert offsets == list(range(start, start + len(offsets)))
    return got


# ------------------------------------------------------------------ tests

def test_reload_mid_generation_shows_the_answer_once(browser: Any, port: int, room: str) -> None:
    context = browser.new_context()
    page = open_demo(context, f"http://127.0.0.1:{port}", room)
    say(page, "what is a durable session?")
    # Reload while the first answer is still streaming.
    page.wait_for_selector(".msg.assistant[data-done=false] .text:not(:empty)", timeout=WAIT_MS)
    page.reload()
    page.wait_for_selector("#status[data-state=connected]", timeout=WAIT_MS)
    approve(page)
    wait_done(page, 2)
    got = check_page(page, port, room)
    assert got["approvals"] == ["approved"]
    context.close()


def test_network_drop_loses_and_repeats_nothing(browser: Any, port: int, room: str) -> None:
    with ThreadedProxy.running(port) as proxy:
        context = browser.new_context()
        page = open_demo(context, f"http://127.0.0.1:{proxy.port}", room)
        say(page, "keep going while I am offline")
        page.wait_for_selector(".msg.assistant .text:not(:empty)", timeout=WAIT_MS)
        before = len(records(port, room))
        # Offline, and the link dropped, for 5 s while the agent writes on.
        context.set_offline(True)
        proxy.cut()
        time.sleep(5)
        assert len(records(port, room)) > before, "the agent should have kept producing"
        context.set_offline(False)
        approve(page)
        wait_done(page, 2)
        check_page(page, port, room)
        assert proxy.accepted >= 2            # the page did reconnect
        context.close()


def test_two_devices_share_the_transcript_and_the_approval(browser: Any, port: int,
                                                          room: str) -> None:
    base = f"http://127.0.0.1:{port}"
    phone, laptop = browser.new_context(), browser.new_context()
    a = open_demo(phone, base, room)
    b = open_demo(laptop, base, room)
    say(a, "from the phone")
    b.wait_for_selector("button[data-approve]", timeout=WAIT_MS)
    approve(b)                              # clicked on the laptop ...
    for page in (a, b):                     # ... unblocks the agent for both
        wait_done(page, 2)
        page.wait_for_selector("[data-kind=approval][data-decision=approved]", timeout=WAIT_MS)
    for page in (a, b):                     # each sees both devices here
        page.wait_for_selector("#status-here[data-count='2']", timeout=WAIT_MS)
    got_a, got_b = check_page(a, port, room), check_page(b, port, room)
    assert got_a["answers"] == got_b["answers"]
    assert got_a["users"] == got_b["users"] == ["from the phone"]
    phone.close()
    laptop.close()


def test_falls_back_to_sse_when_websockets_are_refused(browser: Any, port: int,
                                                       room: str) -> None:
    with ThreadedProxy.running(port, refuse_upgrades=True) as proxy:
        context = browser.new_context()
        page = open_demo(context, f"http://127.0.0.1:{proxy.port}", room)
        page.wait_for_selector("#status[data-state=connected][data-transport=sse]",
                               timeout=WAIT_MS)
        assert page.inner_text("#status-transport") == "sse"
        say(page, "no websockets here")
        approve(page)                       # the signal goes as an HTTP POST
        wait_done(page, 2)
        got = check_page(page, port, room)
        assert got["transport"] == "sse"
        assert proxy.get("upgrades_refused") >= 2
        context.close()


def test_idle_cuts_lose_nothing(browser: Any, port: int, room: str) -> None:
    with ThreadedProxy.running(port, idle_cut_s=2.0) as proxy:
        context = browser.new_context()
        page = open_demo(context, f"http://127.0.0.1:{proxy.port}", room)
        say(page, "survive the load balancer")
        page.wait_for_selector("button[data-approve]", timeout=WAIT_MS)
        # The agent now waits for us: the link goes idle and is cut.
        deadline = time.monotonic() + WAIT_MS / 1000
        while proxy.get("cuts") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proxy.get("cuts") >= 1
        approve(page)
        wait_done(page, 2)
        got = check_page(page, port, room)
        assert got["transport"] == "ws"
        context.close()


def test_second_message_after_reload_keeps_history(browser: Any, port: int, room: str) -> None:
    """Reading from -1 on load: two turns, a reload between them, one transcript."""
    context = browser.new_context()
    page = open_demo(context, f"http://127.0.0.1:{port}", room, "&transport=longpoll")
    say(page, "first")
    approve(page)
    wait_done(page, 2)
    page.reload()
    page.wait_for_selector("#status[data-state=connected]", timeout=WAIT_MS)
    wait_done(page, 2)
    say(page, "second")
    page.wait_for_function(
        "() => document.querySelectorAll('button[data-approve]:not([disabled])').length == 1",
        timeout=WAIT_MS)
    approve(page)
    wait_done(page, 4)
    got = check_page(page, port, room, users=2)
    assert got["transport"] == "longpoll"
    context.close()



def test_a_late_page_renders_the_view_from_far_fewer_frames(browser: Any, port: int,
                                                             room: str) -> None:
    """A page loaded after a whole turn shows what a page that watched it live
    shows, from one view instead of every record."""
    base = f"http://127.0.0.1:{port}"
    context = browser.new_context()
    live = open_demo(context, base, room)
    say(live, "late joiners")
    approve(live)
    wait_done(live, 2)
    live.wait_for_selector("#status-agent[data-state=idle]", timeout=WAIT_MS)
    check_page(live, port, room)
    late = open_demo(browser.new_context(), base, room)
    wait_done(late, 2)
    late.wait_for_selector("#status-agent[data-state=idle]", timeout=WAIT_MS)
    check_page(late, port, room)
    transcript = "() => window.brokerDemo.transcript()"
    assert late.evaluate(transcript) == live.evaluate(transcript)
    stats = "() => window.brokerDemo.client.stats"
    live_stats, late_stats = live.evaluate(stats), late.evaluate(stats)
    # The live page got every record the turn made, the late one a view of them.
    assert live_stats["records"] >= 40
    assert late_stats["views"] == 1 and late_stats["records"] <= 2
    assert late_stats["frames"] * 10 <= live_stats["frames"]
    context.close()

"""Presence over HTTP (docs/protocol.md, "Presence"): SSE responses and
long-poll readers as members, ``Broker-Presence``, ``view=presence``, and the
Python client's HTTP transports.

A real server runs in-process; requests go over real sockets with httpx.
The long-poll linger is driven with Trio's mock clock, so "still there
after 9 s, gone after 11 s" needs no sleeping.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from broker import _frames as F
from broker import client
from broker._auth import Authenticator, mint
from broker._config import FsyncPolicy
from conftest import Served, serve_in_process

SECRET = "a test secret that is long enough for HS256"
TEXT = {"content-type": "text/plain"}


def url(name: str) -> str:
    return f"/v1/stream/{name}"


class Heard:
    """A watcher on the server's own registry: what joined and left, and an
    event per change, so a test waits for a leave instead of sleeping."""

    def __init__(self, served: Served, session: str) -> None:
        self.events: list[tuple[str, F.Member]] = []
        self.changed = trio.Event()
        served.broker.presence.watch(session, self)

    def __call__(self, kind: str, member: F.Member) -> None:
        self.events.append((kind, member))
        self.changed.set()

    async def wait_for(self, kind: str, n: int = 1) -> F.Member:
        """The ``n``-th event of ``kind``, once it has happened (bounded)."""
        with trio.fail_after(10):
            while sum(k == kind for k, _ in self.events) < n:
                self.changed = trio.Event()
                await self.changed.wait()
        return [m for k, m in self.events if k == kind][n - 1]


async def members(http: httpx.AsyncClient, name: str, **headers: str) -> list[dict[str, Any]]:
    r = await http.get(url(name), params={"view": "presence"}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store" and "broker-epoch" in r.headers
    got: list[dict[str, Any]] = r.json()["members"]
    return got


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[Served]:
    # A keep-alive every 0.2 s: an SSE client that goes away is seen at the next one.
    async with serve_in_process(tmp_path / "data", streams={"long_poll_timeout_s": 0.2,
                                                            "sse_max_s": 60.0}) as s:
        yield s


@pytest.fixture
async def http(srv: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=30) as c:
        r = await c.put(url("chat"), headers=TEXT, content=b"hello")
        assert r.status_code == 201
        yield c


# ---------------------------------------------------------------- SSE

async def test_an_sse_reader_is_a_member_until_it_goes(srv: Served,
                                                       http: httpx.AsyncClient) -> None:
    heard = Heard(srv, "chat")
    async with client.open_connection(srv.ws_url, client_id="watcher") as ws:
        watcher = await ws.attach("chat", presence=True, hidden=True)
        assert await watcher.next_frame() == F.Members("chat", ())
        async with http.stream("GET", url("chat"), params={"offset": "now", "live": "sse"},
                               headers={"Broker-Client": "tv",
                                        "Broker-Presence": '{"device": "tv", "n": 1}'}) as r:
            assert r.status_code == 200
            m = await heard.wait_for("join")
            assert (m.client, m.transport, m.info) == ("tv", "sse", {"device": "tv", "n": 1})
            assert m.id.startswith("sse-")
            assert await members(http, "chat") == [m.as_map()]
            # A WebSocket subscriber sees it too.
            frame = await watcher.next_frame()
            while not isinstance(frame, F.Join):
                frame = await watcher.next_frame()
            assert frame.member == m
        # The client closed the response: the server sees it at its next
        # keep-alive, ends the response, and the reader leaves.
        assert await heard.wait_for("leave") == m
        frame = await watcher.next_frame()
        while not isinstance(frame, F.Leave):
            frame = await watcher.next_frame()
        assert frame.member == m
    assert await members(http, "chat") == []


async def test_an_sse_response_that_ends_leaves(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path / "data", streams={"sse_max_s": 0.3}) as s, \
            httpx.AsyncClient(base_url=s.http_url, timeout=30) as http:
        await http.put(url("chat"), headers=TEXT)
        heard = Heard(s, "chat")
        async with http.stream("GET", url("chat"),
                               params={"offset": "-1", "live": "sse"}) as r:
            async for _ in r.aiter_bytes():
                pass                                   # to its end, after sse_max_s
        assert [k for k, _ in heard.events] == ["join", "leave"]
        anon = heard.events[0][1]
        assert anon.client == f"anon-{anon.id}" and anon.info is None   # no Broker-Client
        assert await members(http, "chat") == []


async def test_a_hidden_reader_is_not_shown(srv: Served, http: httpx.AsyncClient) -> None:
    heard = Heard(srv, "chat")
    async with http.stream("GET", url("chat"), params={"offset": "now", "live": "sse"},
                           headers={"Broker-Presence": "Hidden"}) as r:
        assert r.status_code == 200
        r2 = await http.get(url("chat"), params={"offset": "now", "live": "long-poll"},
                            headers={"Broker-Presence": "hidden", "Broker-Client": "bob"})
        assert r2.status_code == 204
        assert await members(http, "chat") == []
    assert heard.events == []


# ---------------------------------------------------------------- long-poll

async def test_a_long_poll_reader_lingers_between_polls(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    async with serve_in_process(tmp_path / "data", fsync=FsyncPolicy("never"),
                                streams={"long_poll_timeout_s": 30.0,
                                         "presence_linger_s": 10.0}) as s, \
            httpx.AsyncClient(base_url=s.http_url, timeout=1000) as http:
        await http.put(url("chat"), headers=TEXT)
        heard = Heard(s, "chat")
        answers: list[httpx.Response] = []

        async def poll(offset: int, **headers: str) -> None:
            answers.append(await http.get(url("chat"), headers=headers, params={
                "offset": f"0000000000000000_{offset:016d}", "live": "long-poll"}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll, 0)                                # anonymous: not shown
            nursery.start_soon(lambda: poll(0, **{"Broker-Client": "bob",
                                                  "Broker-Presence": '{"role": "reader"}'}))
            await trio.testing.wait_all_tasks_blocked()
            [(kind, m)] = heard.events
            assert (kind, m.client, m.transport, m.info) == (
                "join", "bob", "longpoll", {"role": "reader"})
            assert m.id.startswith("lp-")
            await s.broker.append("chat", b"one")                      # both polls answer
        assert [r.status_code for r in answers] == [200, 200]
        mock_clock.jump(9)
        await trio.testing.wait_all_tasks_blocked()
        assert s.broker.presence.members("chat") == [m]                # lingering
        async with trio.open_nursery() as nursery:                     # polls again in time
            nursery.start_soon(lambda: poll(1, **{"Broker-Client": "bob"}))
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(20)                                        # a long wait: held
            await trio.testing.wait_all_tasks_blocked()
            assert s.broker.presence.members("chat") == [m]
            await s.broker.append("chat", b"two")
        assert len(heard.events) == 1                                  # one member all along
        mock_clock.jump(9.5)
        await trio.testing.wait_all_tasks_blocked()
        assert s.broker.presence.members("chat") == [m]
        mock_clock.jump(1)                                             # 10.5 s after the poll
        assert await heard.wait_for("leave") == m
        assert s.broker.presence.members("chat") == []


# ---------------------------------------------------------------- errors, view, auth

BAD_PRESENCE = [
    "visible", "[1]", '"agent"', '{"k": {"a": 1}}', '{"k": [1]}', '{"": 1}',
    '{"k": "' + "v" * 257 + '"}', '{"a": 1e400}', '{"a": NaN}', '{"a": 9007199254740992}',
    json.dumps({str(i): i for i in range(17)}), '{"k": "' + "v" * 5000 + '"}',
]


@pytest.mark.parametrize("live", ["sse", "long-poll"])
@pytest.mark.parametrize("value", BAD_PRESENCE, ids=lambda v: v[:30])
async def test_bad_broker_presence_is_a_400(srv: Served, http: httpx.AsyncClient, live: str,
                                            value: str) -> None:
    r = await http.get(url("chat"), params={"offset": "now", "live": live},
                       headers={"Broker-Presence": value})
    assert r.status_code == 400, r.text
    body = r.json()["error"]
    assert body["code"] == "bad_presence" and "Broker-Presence" in body["message"]
    assert srv.broker.presence.members("chat") == []


@pytest.mark.parametrize("params, status, code", [
    ({"view": "presence", "offset": "-1"}, 400, "bad_view"),
    ({"view": "presence", "live": "sse"}, 400, "bad_view"),
    ({"view": "presence", "kinds": "1"}, 400, "bad_view"),
    ({"view": ["presence", "records"]}, 400, "bad_view"),
])
async def test_view_presence_refusals(http: httpx.AsyncClient, params: dict[str, Any],
                                      status: int, code: str) -> None:
    r = await http.get(url("chat"), params=params)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


async def test_view_presence_of_a_missing_stream_is_404(http: httpx.AsyncClient) -> None:
    r = await http.get(url("nowhere"), params={"view": "presence"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


async def test_presence_is_never_in_the_log(srv: Served, http: httpx.AsyncClient) -> None:
    heard = Heard(srv, "chat")
    async with http.stream("GET", url("chat"), params={"offset": "now", "live": "sse"},
                           headers={"Broker-Client": "tv"}):
        await heard.wait_for("join")
        for _ in range(3):
            await http.get(url("chat"), params={"offset": "now", "live": "long-poll"},
                           headers={"Broker-Client": "bob"})
        assert len(await members(http, "chat")) == 2
    r = await http.get(url("chat"), params={"offset": "-1"})
    assert r.content == b"hello" and r.headers["stream-next-offset"].endswith("1")
    r = await http.get(url("chat"), params={"offset": "-1", "view": "records"})
    assert [rec["d"] for rec in r.json()] == ["hello"]


async def test_with_auth_presence_needs_read_and_names_the_sub(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path / "data", auth=Authenticator(SECRET)) as s, \
            httpx.AsyncClient(base_url=s.http_url, timeout=30) as http:
        admin = {"authorization": "Bearer " + mint("admin", {"*": ["*"]}, secret=SECRET)}
        reader = {"authorization": "Bearer " + mint("carol", {"chat": ["read"]}, secret=SECRET)}
        writer = {"authorization": "Bearer " + mint("dave", {"chat": ["append"]},
                                                    secret=SECRET)}
        await http.put(url("chat"), headers={**admin, **TEXT})
        r = await http.get(url("chat"), params={"view": "presence"}, headers=writer)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await http.get(url("chat"), params={"view": "presence"})
        assert r.status_code == 401
        heard = Heard(s, "chat")
        async with http.stream("GET", url("chat"), params={"offset": "now", "live": "sse"},
                               headers={**reader, "Broker-Client": "mallory"}):
            await heard.wait_for("join")
            got = await members(http, "chat", **reader)
            # With auth on the client id is the token's sub, whatever the header says.
            assert [(m["client"], m["transport"]) for m in got] == [("carol", "sse")]


# ---------------------------------------------------------------- the Python client over HTTP

@pytest.mark.parametrize("transport", ["sse", "longpoll"])
async def test_the_client_over_http_is_shown_and_asks(srv: Served, http: httpx.AsyncClient,
                                                      transport: str) -> None:
    heard = Heard(srv, "chat")
    async with client.connect(srv.ws_url, client_id="http-ui", transports=(transport,),
                              presence_info={"device": "kiosk"}) as c:
        assert c.transport == transport
        chat = c.session("chat")
        async with chat.subscribe("-1") as sub:
            assert (await sub.__anext__()).payload == b"hello"
            m = await heard.wait_for("join")
            assert (m.client, m.transport, m.info) == ("http-ui", transport,
                                                       {"device": "kiosk"})
            assert m in await chat.presence()
        with pytest.raises(client.ClientError) as e:
            await c.session("nowhere").presence()
        assert e.value.code == "session_not_found"

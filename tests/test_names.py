"""Session names: the rule (``check_name``), its file names (``dir_name``), and
traversal and trick attempts over every way a name comes in.

Each attempt is sent as raw bytes over HTTP (httpx would normalize ``..`` and
percent-escapes away before the server saw them), in WebSocket frames, and
through the Python API.  Each must get its clear refusal, and the whole tree
around the data directory (the data directory itself, its parent, and a
sentinel tree placed where a traversal would land) must be byte-for-byte
what it was before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from hypothesis import example, given
from hypothesis import strategies as st

import broker
from broker import _frames
from broker._meta import MAX_NAME_BYTES, check_name, dir_name

from _wsraw import RawWs
from conftest import Served, serve_in_process

SHA = hashlib.sha256(b"a" * 255).hexdigest()

# Names a client might send, as Python strings, with why each is refused.
REFUSED = [
    ("", "empty"),
    ("..", "dot-dot"),
    (".", "dot"),
    ("../x", "dot-dot"),
    ("a/../../x", "dot-dot"),
    ("a/./b", "dot"),
    ("/etc/passwd", "empty segment"),
    ("a/", "empty segment"),
    ("a//b", "empty segment"),
    ("..\\..\\x", "backslash"),
    ("a\\b", "backslash"),
    ("a\x00b", "NUL"),
    ("\x00", "NUL"),
    ("a\nb", "control"),
    ("a\r\nx-injected: 1", "control"),
    ("a b", "space"),
    ("%2e%2e%2f", "percent (double-encoded)"),
    ("\uff0e\uff0e\uff0f", "fullwidth ../"),
    ("a\u202eb", "right-to-left override"),
    ("a\u200bb", "zero-width space"),
    ("\u0430dmin", "Cyrillic a"),
    ("\ufb01le", "ligature (NFKC: file)"),
    ("e\u0301", "combining accent"),
    ("\ufffd\ufffd", "replacement characters (from overlong UTF-8)"),
    ("x" * (MAX_NAME_BYTES + 1), "too long"),
    ("x" * 5000, "too long"),
    ("CON", "device"),
    ("a/nul.txt", "device"),
    ("Com1", "device"),
    ("lpt9.json", "device"),
    ("a.", "trailing dot"),
    ("a/b...", "trailing dot"),
    ("a*b", "glob star"),
    ("a?b", "question mark"),
    ("a#b", "hash"),
]

# Odd but allowed: each must land in its own directory inside the data dir.
ALLOWED = ["c:/x", "~root", "-rf", ".hidden", "a..b", "...a", "con-x", "concurrent",
           "__ds/jwks.json", "u@example.com/chat,1+2=3", "h_" + SHA, "a" * 255,
           "x" * MAX_NAME_BYTES]


# ------------------------------------------------------------------ the rule

def model_ok(name: str) -> bool:
    """The rule of docs/security.md, written out independently of check_name."""
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/-_.~:@+=,")
    devices = {"con", "prn", "aux", "nul"} | {f"{d}{i}" for d in ("com", "lpt")
                                             for i in range(10)}
    return (0 < len(name) <= 255 and set(name) <= allowed
            and all(seg and not seg.endswith(".") and seg.split(".")[0].lower() not in devices
                    for seg in name.split("/")))


@pytest.mark.parametrize(("name", "why"), REFUSED)
def test_check_name_refuses(name: str, why: str) -> None:
    with pytest.raises(broker.InvalidSessionName) as e:
        check_name(name)
    assert e.value.code == "invalid_session_name"
    assert len(str(e.value)) < 300        # a 5000-byte name is not echoed whole


@pytest.mark.parametrize("name", ALLOWED)
def test_check_name_allows(name: str) -> None:
    check_name(name)
    assert model_ok(name)


@pytest.mark.parametrize("value", [None, b"abc", 5, ["a"]])
def test_check_name_refuses_non_strings(value: object) -> None:
    with pytest.raises(broker.InvalidSessionName):
        check_name(value)


# An alphabet that makes valid names, near misses and tricks all likely.
tricky = st.text(st.sampled_from(list("aZ09./\\-_~:@+=,%* \x00\u202e\uff0fCONulx")) |
                 st.characters(codec=None, exclude_categories=()), max_size=24)


@given(tricky)
@example("con.x/y")
@example("a" * 256)
@example("nUl")
def test_check_name_agrees_with_the_model(name: str) -> None:
    try:
        check_name(name)
    except broker.InvalidSessionName:
        assert not model_ok(name)
    else:
        assert model_ok(name)


# ------------------------------------------------------------------ dir_name

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)


def assert_one_safe_component(d: str) -> None:
    assert d and d not in (".", "..") and len(d) <= 200
    assert re.fullmatch(r"[A-Za-z0-9_%-]+", d), d
    base = os.path.join("/data", "sessions")
    assert os.path.dirname(os.path.normpath(os.path.join(base, d))) == base


@given(any_text)
@example("")
@example("..")
@example("/")
@example("\x00")
@example("\ud800")
def test_dir_name_is_always_one_safe_component(name: str) -> None:
    assert_one_safe_component(dir_name(name))


@given(any_text, any_text)
def test_dir_name_keeps_distinct_names_apart(a: str, b: str) -> None:
    if a != b:
        assert dir_name(a) != dir_name(b)


@pytest.mark.parametrize(("a", "b"), [
    ("a" * 255, "h_" + SHA),                             # the hashed form, spelt out
    ("", "h_" + hashlib.sha256(b"").hexdigest()),
    ("%41", "A"), ("%2E", "."), ("a/b", "a%2Fb"), ("H_" + SHA, "h_" + SHA),
])
def test_dir_name_collision_attempts(a: str, b: str) -> None:
    assert dir_name(a) != dir_name(b)
    assert_one_safe_component(dir_name(a))
    assert_one_safe_component(dir_name(b))


# ------------------------------------------------------------- the file tree

Snapshot = dict[str, tuple[str, int, str]]


def snapshot(root: Path) -> Snapshot:
    """Every path under ``root``: kind, mode and content hash (files) or target (links)."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st_ = p.lstat()
            if p.is_symlink():
                out[str(p.relative_to(root))] = ("link", st_.st_mode, os.readlink(p))
            elif p.is_dir():
                out[str(p.relative_to(root))] = ("dir", st_.st_mode, "")
            else:
                out[str(p.relative_to(root))] = (
                    "file", st_.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def plant_sentinels(root: Path) -> None:
    """Files where a traversal out of data/sessions/ would land."""
    for rel in ("x", "etc/passwd", "data/x", "sentinel/deep/file", "a/x"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"sentinel {rel}\n")


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[Served]:
    plant_sentinels(tmp_path)
    async with serve_in_process(tmp_path / "data") as s:
        yield s


# ---------------------------------------------------------------- raw HTTP

async def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def request(method: str, target: bytes, body: bytes = b"") -> bytes:
    """A request; ``body`` goes only with PUT and POST."""
    if method not in ("PUT", "POST"):
        body = b""
    return (method.encode() + b" /v1/stream/" + target + b" HTTP/1.1\r\nhost: localhost\r\n"
            b"content-type: text/plain\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body))


# Targets as they travel, after /v1/stream/.  Each decodes to a refused name,
# or is not even a valid HTTP target (then the parser's 400 bad_request).
HTTP_TARGETS = [
    (b"../x", "invalid_session_name"),
    (b"a/../../x", "invalid_session_name"),
    (b"..", "invalid_session_name"),
    (b"./a", "invalid_session_name"),
    (b"/etc/passwd", "invalid_session_name"),
    (b"%2e%2e%2fx", "invalid_session_name"),
    (b"%2E%2E/%2E%2E/etc/passwd", "invalid_session_name"),
    (b"..%2f..%2fetc%2fpasswd", "invalid_session_name"),
    (b"%2fetc%2fpasswd", "invalid_session_name"),
    (b"%252e%252e%252f", "invalid_session_name"),
    (b"a%00b", "invalid_session_name"),
    (b"%00", "invalid_session_name"),
    (b"..%5c..%5cx", "invalid_session_name"),
    (b"a\\..\\..\\x", "invalid_session_name"),
    (b"%EF%BC%8E%EF%BC%8E%EF%BC%8Fx", "invalid_session_name"),   # fullwidth ../
    (b"a%E2%80%AEb", "invalid_session_name"),                    # U+202E
    (b"%C0%AE%C0%AE%C0%AFx", "invalid_session_name"),            # overlong UTF-8 ../
    (b"%E0%80%AE", "invalid_session_name"),                      # overlong, 3 bytes
    (b"%ff%fe", "invalid_session_name"),
    (b"%D0%B0dmin", "invalid_session_name"),                     # Cyrillic a
    (b"a%0d%0ax-injected:%201", "invalid_session_name"),
    (b"a%20b", "invalid_session_name"),
    (b"a" * 256, "invalid_session_name"),
    (b"CON", "invalid_session_name"),
    (b"x/nul.txt", "invalid_session_name"),
    (b"a.", "invalid_session_name"),
    (b"a/b..", "invalid_session_name"),
    (b"a%2F", "invalid_session_name"),
    (b"a#b", "invalid_session_name"),
    (b"%", "invalid_session_name"),
    (b"\xc0\xae\xc0\xae/x", "bad_request"),                      # raw bytes: not a URL
    (b"\xef\xbc\x8e\xef\xbc\x8e", "bad_request"),
    (b"a\x00b", "bad_request"),
    (b"a" * 70_000, "bad_request"),                              # over the header limit
]


@pytest.mark.parametrize(("target", "code"), HTTP_TARGETS,
                         ids=[t[:40].decode("latin-1") for t, _ in HTTP_TARGETS])
async def test_http_refuses_traversal(world: Served, tmp_path: Path, target: bytes,
                                      code: str) -> None:
    before = snapshot(tmp_path)
    for method in ("PUT", "POST", "GET", "DELETE"):
        status, headers, body = await raw_http(world.port, request(method, target, b"hi"))
        assert status == 400, (method, status, body)
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == code, (method, body)
    status, _, _ = await raw_http(world.port, request("HEAD", target))
    assert status == 400
    assert snapshot(tmp_path) == before
    # The server carries on.
    status, _, _ = await raw_http(world.port, request("PUT", b"fine", b"ok"))
    assert status == 201


@pytest.mark.parametrize("name", ALLOWED)
async def test_http_odd_names_stay_inside(world: Served, tmp_path: Path, name: str) -> None:
    before = snapshot(tmp_path)
    target = name.replace("/", "%2F").encode()        # either form means the same name
    status, _, body = await raw_http(world.port, request("PUT", target, name.encode()))
    assert status == 201, body
    status, _, body = await raw_http(world.port, request("GET", name.encode() + b"?offset=-1"))
    assert status == 200 and body == name.encode()
    after = snapshot(tmp_path)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    session = os.path.join("data", "sessions", dir_name(name))
    assert all(p == "data/broker.json" or p == "data/sessions" or p == session
               or p.startswith(session + "/") for p in changed), changed
    assert session in changed


async def test_a_name_cannot_reach_another_names_hashed_directory(world: Served) -> None:
    long = "a" * 255
    status, _, _ = await raw_http(world.port, request("PUT", long.encode(), b"victim"))
    assert status == 201
    status, _, _ = await raw_http(world.port, request("PUT", b"h_" + SHA.encode(), b"mine"))
    assert status == 201
    _, _, body = await raw_http(world.port, request("GET", b"h_" + SHA.encode() + b"?offset=-1"))
    assert body == b"mine"
    _, _, body = await raw_http(world.port, request("GET", long.encode() + b"?offset=-1"))
    assert body == b"victim"


# ---------------------------------------------------------------- WebSocket

WS_NAMES = [n for n, _ in REFUSED if n]


@pytest.mark.parametrize("name", WS_NAMES, ids=[repr(n)[:40] for n in WS_NAMES])
async def test_ws_refuses_traversal(world: Served, tmp_path: Path, name: str) -> None:
    before = snapshot(tmp_path)
    ws = await RawWs.connect(world.port)
    try:
        await ws.send({"t": "attach", "id": 1, "s": name, "create": True})
        await ws.send({"t": "publish", "id": 2, "s": name, "r": [b"x"], "create": True})
        await ws.send({"t": "signal", "id": 3, "s": name, "r": b"stop"})
        for want_id in (1, 2, 3):
            err = await ws.frame()
            assert isinstance(err, _frames.Error), err
            assert (err.code, err.id, err.session) == ("invalid_session_name", want_id, name)
        # The connection carries on.
        await ws.send({"t": "attach", "id": 4, "s": "fine", "create": True})
        assert isinstance(await ws.frame(), _frames.Attached)
    finally:
        await ws.aclose()
    after = snapshot(tmp_path)
    new = after.keys() - before.keys()
    assert all(p in ("data/broker.json", "data/sessions/fine")
               or p.startswith("data/sessions/fine/") for p in new), new
    assert all(after[p] == v for p, v in before.items() if p != "data/broker.json")


async def test_ws_name_that_is_not_utf8_is_a_bad_frame(world: Served, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    ws = await RawWs.connect(world.port)
    try:
        # A map {"t": "attach", "id": 1, "s": <overlong UTF-8 for "..">}: a
        # msgpack str that is not UTF-8 is not a string at all.
        await ws.send_message(b"\x83\xa1t\xa6attach\xa2id\x01\xa1s\xa4\xc0\xae\xc0\xae")
        err = await ws.frame()
        assert isinstance(err, _frames.Error) and err.code == "bad_frame"
        await ws.send({"t": "attach", "id": 2, "s": "..", "create": True})
        err = await ws.frame()
        assert isinstance(err, _frames.Error) and err.code == "invalid_session_name"
    finally:
        await ws.aclose()
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- Python API

@pytest.mark.parametrize(("name", "why"), REFUSED)
async def test_api_refuses_traversal(tmp_path: Path, name: str, why: str) -> None:
    plant_sentinels(tmp_path)
    async with broker.open_broker(tmp_path / "data") as b:
        before = snapshot(tmp_path)
        calls = [lambda: b.create(name), lambda: b.append(name, b"x"),
                 lambda: b.read(name), lambda: b.info(name), lambda: b.close_session(name),
                 lambda: b.delete(name), lambda: b.publish(name, [b"x"])]
        for call in calls:
            with pytest.raises(broker.InvalidSessionName):
                await call()
        with pytest.raises(broker.InvalidSessionName):
            async with b.subscribe(name):
                pass
        assert snapshot(tmp_path) == before


async def test_a_directory_holding_another_sessions_meta_is_not_served(tmp_path: Path) -> None:
    # dir_name keeps names apart; a meta.json naming another session means the
    # directory was damaged or planted, and its log must not be served as "a".
    data = tmp_path / "data"
    async with broker.open_broker(data) as b:
        await b.create("a")
        await b.append("a", b"secret")
    meta_file = data / "sessions" / dir_name("a") / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["name"] = "b"
    meta_file.write_text(json.dumps(meta))
    async with broker.open_broker(data) as b:
        with pytest.raises(broker.BrokerError) as refused:
            await b.read("a")
        assert refused.value.code == "storage_error"

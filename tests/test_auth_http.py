"""Token auth on the Durable Streams HTTP API (broker/_streams.py).

A server runs in the test's own Trio run (conftest.serve_in_process) with an
Authenticator, and the tests talk to it over real sockets: httpx for ordinary
requests, a raw socket where the exact bytes of an answer matter.  Tokens are
minted with broker._auth.mint, or put together by hand (json + base64 + hmac)
when a test needs one that mint would refuse to make.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from broker._auth import Authenticator, mint
from broker._errors import SessionNotFound
from broker._session import header_stamp
from conftest import Served, serve_in_process

SECRET = "s" * 32 + "-a-test-secret"
ALL_OPS = ["read", "append", "signal", "create", "delete"]
ADMIN = {"*": ["*"]}
TEXT = {"content-type": "text/plain"}
JSON = {"content-type": "application/json"}
MAX_BATCH = 5


def token(caps: dict[str, list[str]], sub: str = "alice", **kw: Any) -> str:
    return mint(sub, caps, secret=SECRET, **kw)


def bearer(tok: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tok}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def forge(header: dict[str, Any], claims: dict[str, Any], key: bytes | None = SECRET.encode(),
          ) -> str:
    """A JWT built by hand, HMAC-SHA256 signed with ``key`` (unsigned if None)."""
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = b"" if key is None else hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(sig)}"


def claims(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": int(time.time()) + 3600, "caps": ADMIN}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[Served]:
    async with serve_in_process(tmp_path / "data", auth=Authenticator(SECRET),
                                streams={"max_batch_records": MAX_BATCH,
                                         "long_poll_timeout_s": 60.0, "sse_max_s": 60.0}) as s:
        yield s


@pytest.fixture
async def http(srv: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=30) as c:
        yield c


async def make(http: httpx.AsyncClient, name: str, *records: bytes) -> None:
    """Create ``name`` as text, holding ``records``, with an admin token."""
    admin = bearer(token(ADMIN))
    r = await http.put(f"/v1/stream/{name}", headers={**admin, **TEXT})
    assert r.status_code in (200, 201), r.text
    for rec in records:
        r = await http.post(f"/v1/stream/{name}", headers={**admin, **TEXT}, content=rec)
        assert r.status_code == 204, r.text


def refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    assert r.json()["error"]["message"]


async def raw(port: int, request: bytes) -> bytes:
    """Send one request (with connection: close) and return the whole answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
    return out


def publishers(srv: Served) -> Any:
    """The records of a session as [(payload, header fields or None)]."""
    async def read(name: str) -> list[tuple[bytes, Any]]:
        batch = await srv.broker.read(name)
        out = []
        for i in range(len(batch)):
            meta = batch.meta(i)
            out.append((bytes(batch.payload(i)),
                        None if meta is None else msgpack.unpackb(meta)))
        return out
    return read


# ------------------------------------------------------------- refusals

async def test_no_token_is_401_with_a_challenge(srv: Served, http: httpx.AsyncClient) -> None:
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE"):
        r = await http.request(method, "/v1/stream/chat/x", headers=TEXT, content=b"")
        assert r.status_code == 401, (method, r.text)
        assert r.headers["www-authenticate"] == 'Bearer realm="broker"'
        if method != "HEAD":
            refused(r, 401, "unauthorized")


def _bad_tokens() -> dict[str, tuple[str, str]]:
    good = token(ADMIN)
    head, payload, sig = good.split(".")
    mid = len(sig) // 2
    # The middle of the signature: flipping the last base64 character may only
    # change padding bits, and decode to the same signature.
    flipped = sig[:mid] + ("A" if sig[mid] != "A" else "B") + sig[mid + 1:]
    body = json.loads(unb64(payload))
    body["sub"] = "mallory"
    return {
        "garbage": ("not-a-token", "token_invalid"),
        "three garbage parts": ("a.b.c", "token_invalid"),
        "expired": (token(ADMIN, now=time.time() - 7200, ttl_s=3600), "token_expired"),
        "alg none": (forge({"alg": "none", "typ": "JWT"}, claims(), key=None), "token_invalid"),
        "wrong key": (mint("alice", ADMIN, secret="w" * 40), "token_invalid"),
        "flipped signature": (f"{head}.{payload}.{flipped}", "token_invalid"),
        "payload changed": (f"{head}.{b64(json.dumps(body).encode())}.{sig}", "token_invalid"),
        "unknown op": (forge({"alg": "HS256", "typ": "JWT"},
                             claims(caps={"chat/*": ["read", "fly"]})), "token_invalid"),
        "caps not an object": (forge({"alg": "HS256"}, claims(caps=["chat/*"])),
                               "token_invalid"),
        "missing sub": (forge({"alg": "HS256"}, claims(sub=None)), "token_invalid"),
        "empty sub": (forge({"alg": "HS256"}, claims(sub="")), "token_invalid"),
        "missing exp": (forge({"alg": "HS256"}, claims(exp=None)), "token_invalid"),
        "exp not a number": (forge({"alg": "HS256"}, claims(exp="tomorrow")), "token_invalid"),
        "too long": ("x" * 9000, "token_invalid"),
    }


@pytest.mark.parametrize("case", list(_bad_tokens()))
async def test_a_bad_token_is_401(srv: Served, http: httpx.AsyncClient, case: str) -> None:
    await make(http, "chat/x", b"hi")
    bad, code = _bad_tokens()[case]
    for req in (http.build_request("GET", "/v1/stream/chat/x", headers=bearer(bad)),
                http.build_request("GET", "/v1/stream/chat/x", params={"token": bad})):
        r = await http.send(req)
        refused(r, 401, code)
        assert r.headers["www-authenticate"] == 'Bearer realm="broker", error="invalid_token"'
    # A refusal costs nothing else: the stream is untouched and a good token works.
    r = await http.get("/v1/stream/chat/x", headers=bearer(token(ADMIN)))
    assert r.status_code == 200 and r.content == b"hi"


@pytest.mark.parametrize("caps, name, method", [
    ({"chat/u1/*": ["*"]}, "chat/u12/x", "GET"),        # a prefix of a segment is not a match
    ({"chat/u1/*": ["*"]}, "chat/u1", "GET"),           # nor is the directory itself
    ({"chat/u1/*": ["*"]}, "xchat/u1/x", "GET"),        # the glob is anchored at the start
    ({"chat/u1": ["*"]}, "chat/u1/x", "GET"),           # and at the end
    ({"*": ["read"]}, "chat/u1/x", "POST"),             # read-only everywhere
    ({"chat/*": ["append"]}, "chat/x", "GET"),
    ({"chat/*": ["signal"]}, "chat/x", "POST"),         # signal is a WebSocket operation
    ({}, "chat/x", "GET"),                              # no caps at all
    ({"chat/?": ["*"]}, "chat/x", "GET"),               # only * is special
])
async def test_caps_that_do_not_match_are_403(srv: Served, http: httpx.AsyncClient,
                                              caps: dict[str, list[str]], name: str,
                                              method: str) -> None:
    await make(http, name, b"hi")
    r = await http.request(method, f"/v1/stream/{name}", headers={**bearer(token(caps)), **TEXT},
                           content=b"more" if method == "POST" else b"")
    refused(r, 403, "forbidden")
    assert r.headers["www-authenticate"] == 'Bearer realm="broker", error="insufficient_scope"'
    assert name in r.json()["error"]["message"]


@pytest.mark.parametrize("caps, name", [
    ({"chat/u1/*": ["read"]}, "chat/u1/x"),
    ({"chat/u1/*": ["read"]}, "chat/u1/x/y"),           # * crosses /
    ({"chat/*/inbox": ["read"]}, "chat/u1/inbox"),
    ({"a/*": ["append"], "chat/*": ["read"]}, "chat/x"),  # any glob that matches may grant it
    ({"*": ["*"]}, "chat/x"),
])
async def test_caps_that_match_allow(srv: Served, http: httpx.AsyncClient,
                                     caps: dict[str, list[str]], name: str) -> None:
    await make(http, name, b"hi")
    r = await http.get(f"/v1/stream/{name}", headers=bearer(token(caps)))
    assert r.status_code == 200 and r.content == b"hi", r.text


async def test_403_is_the_same_whether_or_not_the_stream_exists(
        srv: Served, http: httpx.AsyncClient) -> None:
    await make(http, "other/aaaa", b"secret")
    tok = token({"chat/*": ["*"]})
    answers = []
    for name in ("other/aaaa", "other/bbbb"):     # exists, does not; same length
        for method in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE"):
            got = await raw(srv.port, method + b" /v1/stream/" + name.encode()
                            + b" HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer " + tok.encode()
                            + b"\r\ncontent-type: text/plain\r\ncontent-length: 1\r\n"
                              b"connection: close\r\n\r\nx")
            assert got.startswith(b"HTTP/1.1 403 "), got
            answers.append((method, got.replace(name.encode(), b"NAME")))
    assert answers[:5] == answers[5:]
    # Without a token, the answer is a 401 whether or not the stream exists.
    for name in ("other/aaaa", "other/bbbb"):
        r = await http.get(f"/v1/stream/{name}")
        refused(r, 401, "unauthorized")


async def test_401_before_404_and_405(srv: Served, http: httpx.AsyncClient) -> None:
    refused(await http.get("/v1/stream/"), 401, "unauthorized")
    refused(await http.request("PATCH", "/v1/stream/x"), 401, "unauthorized")
    admin = bearer(token(ADMIN))
    refused(await http.get("/v1/stream/", headers=admin), 404, "not_found")
    refused(await http.request("PATCH", "/v1/stream/x", headers=admin), 405,
            "method_not_allowed")
    refused(await http.get("/v1/stream/nope", headers=admin), 404, "session_not_found")


# ------------------------------------------------------ where the token goes

async def test_token_in_the_query_and_header_precedence(srv: Served,
                                                        http: httpx.AsyncClient) -> None:
    await make(http, "chat/x", b"hi")
    good, bad = token({"chat/*": ["read"]}), token({"other/*": ["read"]})
    r = await http.get("/v1/stream/chat/x", params={"token": good})
    assert r.status_code == 200 and r.content == b"hi"
    # The header wins over the query, both ways.
    r = await http.get("/v1/stream/chat/x", params={"token": bad}, headers=bearer(good))
    assert r.status_code == 200
    refused(await http.get("/v1/stream/chat/x", params={"token": good}, headers=bearer(bad)),
            403, "forbidden")
    # Another scheme (a proxy's Basic) is not ours: the query token is used.
    r = await http.get("/v1/stream/chat/x", params={"token": good},
                       headers={"authorization": "Basic dXNlcjpwdw=="})
    assert r.status_code == 200
    refused(await http.get("/v1/stream/chat/x", headers={"authorization": "Basic dXNlcjpwdw=="}),
            401, "unauthorized")
    # An empty Bearer wins over the query too (httpx will not send one: raw).
    got = await raw(srv.port, b"GET /v1/stream/chat/x?token=" + good.encode()
                    + b" HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer \r\n"
                      b"connection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 401 ") and b'"unauthorized"' in got, got
    refused(await http.get("/v1/stream/chat/x", params=[("token", good), ("token", good)]),
            401, "token_invalid")
    r = await http.get("/v1/stream/chat/x", headers={"authorization": f"bearer  {good}"})
    assert r.status_code == 200


async def test_cors_preflight_needs_no_token(srv: Served) -> None:
    got = await raw(srv.port, b"OPTIONS /v1/stream/chat/x HTTP/1.1\r\nhost: localhost\r\n"
                              b"origin: https://app.example\r\n"
                              b"access-control-request-method: POST\r\n"
                              b"access-control-request-headers: authorization\r\n"
                              b"connection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 204 "), got
    allowed = [line for line in got.lower().split(b"\r\n")
               if line.startswith(b"access-control-allow-headers:")]
    assert allowed and b"authorization" in allowed[0]


# ---------------------------------------------------- method -> operation

PRODUCER = {"producer-id": "p1", "producer-epoch": "0", "producer-seq": "0"}

# (method, path, headers, body, needs): ``needs`` is every (stream, op) the
# request must be allowed; streams "chat/src" (with a record) and "chat/dst"
# exist beforehand unless the request creates one.
OPERATION_CASES = [
    ("GET", "chat/src", {}, b"", [("chat/src", "read")]),
    ("GET", "chat/src?offset=-1&live=long-poll", {}, b"", [("chat/src", "read")]),
    ("HEAD", "chat/src", {}, b"", [("chat/src", "read")]),
    ("POST", "chat/src", TEXT, b"more", [("chat/src", "append")]),
    ("POST", "chat/src", {**TEXT, **PRODUCER}, b"more", [("chat/src", "append")]),
    ("POST", "chat/src", {"stream-closed": "true"}, b"", [("chat/src", "append")]),
    ("PUT", "chat/new", TEXT, b"", [("chat/new", "create")]),
    ("PUT", "chat/new", TEXT, b"first", [("chat/new", "create"), ("chat/new", "append")]),
    ("PUT", "chat/new", {"stream-forked-from": "/v1/stream/chat/src"}, b"",
     [("chat/new", "create"), ("chat/src", "read")]),
    ("PUT", "chat/new", {"stream-forked-from": "chat/src", **TEXT}, b"more",
     [("chat/new", "create"), ("chat/new", "append"), ("chat/src", "read")]),
    ("DELETE", "chat/src", {}, b"", [("chat/src", "delete")]),
]


@pytest.mark.parametrize("method, target, headers, body, needs", OPERATION_CASES)
async def test_each_method_needs_its_operations(srv: Served, http: httpx.AsyncClient,
                                                method: str, target: str,
                                                headers: dict[str, str], body: bytes,
                                                needs: list[tuple[str, str]]) -> None:
    await make(http, "chat/src", b"hi")
    url = f"/v1/stream/{target}"
    # Missing any one of the operations is a 403, and changes nothing.
    streams = {stream for stream, _ in needs}
    for missing in needs:
        # Every operation on every stream involved, but ``missing``.
        caps = {stream: [op for op in ALL_OPS if (stream, op) != missing] for stream in streams}
        r = await http.request(method, url, headers={**bearer(token(caps)), **headers},
                               content=body)
        assert r.status_code == 403, (missing, r.status_code, r.text)
    info = await srv.broker.info("chat/src")
    assert info.next_offset == 1 and not info.closed
    with pytest.raises(SessionNotFound):
        await srv.broker.info("chat/new")
    # Exactly the operations it needs are enough.
    exact: dict[str, list[str]] = {}
    for stream, op in needs:
        exact.setdefault(stream, []).append(op)
    r = await http.request(method, url, headers={**bearer(token(exact)), **headers},
                           content=body)
    assert r.status_code in (200, 201, 204), r.text


# ------------------------------------------------------------ publishers

async def test_sub_is_stamped_as_the_publisher(srv: Served, http: httpx.AsyncClient) -> None:
    alice = {**bearer(token({"*": ["*"]}, sub="alice")), **JSON}
    bob = {**bearer(token({"*": ["*"]}, sub="bob")), **JSON}
    read = publishers(srv)
    assert (await http.put("/v1/stream/c", headers=alice, content=b"[1]")).status_code == 201
    assert (await http.post("/v1/stream/c", headers=bob, content=b"[2,3]")).status_code == 204
    r = await http.post("/v1/stream/c", headers={**alice, "stream-seq": "a"}, content=b"4")
    assert r.status_code == 204
    assert await read("c") == [(b"1", ["alice"]), (b"2", ["bob"]), (b"3", ["bob"]),
                               (b"4", ["alice"])]
    # A fork's copy keeps no publisher (it is the source's data, not the
    # forker's); what the fork PUT itself adds is stamped.
    r = await http.put("/v1/stream/f", headers={**bob, "stream-forked-from": "c"},
                       content=b"[5]")
    assert r.status_code == 201, r.text
    assert await read("f") == [(b"1", None), (b"2", None), (b"3", None), (b"4", None),
                               (b"5", ["bob"])]


async def test_idempotent_producer_with_a_publisher(srv: Served,
                                                    http: httpx.AsyncClient) -> None:
    alice = {**bearer(token({"*": ["*"]}, sub="alice")), **TEXT}
    read = publishers(srv)
    assert (await http.put("/v1/stream/p", headers=alice)).status_code == 201
    for seq, status in (("0", 200), ("0", 204), ("1", 200), ("3", 409)):
        r = await http.post("/v1/stream/p", headers={**alice, **PRODUCER, "producer-seq": seq},
                            content=b"m" + seq.encode())
        assert r.status_code == status, (seq, r.text)
    records = await read("p")
    assert records == [(b"m0", ["alice", None, ["p1", 0, 0]]),
                       (b"m1", ["alice", None, ["p1", 0, 1]])]
    batch = await srv.broker.read("p")
    assert [header_stamp(m) for _, m in batch.metas()] == [("p1", 0, 0), ("p1", 0, 1)]
    # A close-only producer request takes its place in the sequence.
    r = await http.post("/v1/stream/p", headers={**alice, **PRODUCER, "producer-seq": "2",
                                                 "stream-closed": "true"})
    assert r.status_code == 204 and r.headers["stream-closed"] == "true"


async def test_without_auth_records_have_no_publisher(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.http_url) as http:
        assert (await http.put("/v1/stream/c", headers=JSON, content=b"[1]")).status_code == 201
        assert (await http.post("/v1/stream/c", headers=JSON, content=b"[2]")).status_code == 204
        r = await http.post("/v1/stream/c", headers={**JSON, **PRODUCER}, content=b"3")
        assert r.status_code == 200
        # A token is neither needed nor looked at.
        r = await http.get("/v1/stream/c", params={"token": "junk"},
                           headers={"authorization": "Bearer junk"})
        assert r.json() == [1, 2, 3]
    assert await publishers(served)("c") == [(b"1", None), (b"2", None),
                                             (b"3", [None, None, ["p1", 0, 0]])]


# ----------------------------------------------------------- batch limit

async def test_a_json_array_over_the_batch_limit_is_413(srv: Served,
                                                        http: httpx.AsyncClient) -> None:
    admin = {**bearer(token(ADMIN)), **JSON}
    assert (await http.put("/v1/stream/j", headers=admin)).status_code == 201
    many = json.dumps(list(range(MAX_BATCH + 1))).encode()
    refused(await http.post("/v1/stream/j", headers=admin, content=many), 413, "batch_too_large")
    refused(await http.put("/v1/stream/k", headers=admin, content=many), 413, "batch_too_large")
    r = await http.post("/v1/stream/j", headers=admin,
                        content=json.dumps(list(range(MAX_BATCH))).encode())
    assert r.status_code == 204
    assert (await http.get("/v1/stream/j", headers=admin)).json() == list(range(MAX_BATCH))


# ------------------------------------------------------- expiry and reads

async def test_sse_ends_when_the_token_expires(srv: Served, http: httpx.AsyncClient) -> None:
    await make(http, "chat/x", b"hi")
    short = token({"chat/*": ["read"]}, ttl_s=2)
    events = []
    with trio.fail_after(30):          # sse_max_s and the long-poll wait are 60 s
        async with http.stream("GET", "/v1/stream/chat/x", params={
                "offset": "-1", "live": "sse", "token": short}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                events.append(line)
    # The response ended cleanly (a complete chunked body), after a control event.
    assert "event: data" in events and "event: control" in events
    assert any('"streamNextOffset": "0000000000000000_0000000000000001"' in e for e in events)


async def test_long_poll_waits_at_most_until_expiry(srv: Served,
                                                    http: httpx.AsyncClient) -> None:
    await make(http, "chat/x", b"hi")
    short = token({"chat/*": ["read"]}, ttl_s=2)
    with trio.fail_after(30):          # the long-poll timeout is 60 s
        r = await http.get("/v1/stream/chat/x", headers=bearer(short),
                           params={"offset": "now", "live": "long-poll"})
    assert r.status_code == 204
    assert r.headers["stream-next-offset"] == "0000000000000000_0000000000000001"


async def test_a_live_read_with_a_long_token_still_gets_data(
        srv: Served, http: httpx.AsyncClient) -> None:
    await make(http, "chat/x")
    tok = token({"chat/*": ["read", "append"]})

    async def later() -> None:
        await trio.sleep(0.1)
        await http.post("/v1/stream/chat/x", headers={**bearer(tok), **TEXT}, content=b"yo")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(later)
            r = await http.get("/v1/stream/chat/x", headers=bearer(tok),
                               params={"offset": "-1", "live": "long-poll"})
    assert r.status_code == 200 and r.content == b"yo"


# ----------------------------------------------------------- public keys

def _pems(kind: str) -> tuple[bytes, bytes]:
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey = (
        ed25519.Ed25519PrivateKey.generate() if kind == "ed25519"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


@pytest.mark.parametrize("kind, alg", [("ed25519", "EdDSA"), ("rsa", "RS256")])
async def test_public_key_tokens(tmp_path: Path, kind: str, alg: str) -> None:
    private, public = _pems(kind)
    other_private, _ = _pems(kind)
    async with serve_in_process(tmp_path / "data", auth=Authenticator(public_key_pem=public)) \
            as s, httpx.AsyncClient(base_url=s.http_url) as http:
        good = mint("carol", {"chat/*": ["*"]}, private_key_pem=private)
        assert json.loads(unb64(good.split(".")[0]))["alg"] == alg
        r = await http.put("/v1/stream/chat/x", headers=bearer(good))
        assert r.status_code == 201, r.text
        refused(await http.put("/v1/stream/other/x", headers=bearer(good)), 403, "forbidden")
        forged = mint("carol", ADMIN, private_key_pem=other_private)
        refused(await http.get("/v1/stream/chat/x", headers=bearer(forged)), 401,
                "token_invalid")
        # Algorithm confusion: the public key's PEM used as an HMAC secret.
        confused = forge({"alg": "HS256", "typ": "JWT"}, claims(), key=public)
        refused(await http.get("/v1/stream/chat/x", headers=bearer(confused)), 401,
                "token_invalid")
        # And an HS256 token under any secret is refused by a public-key broker.
        refused(await http.get("/v1/stream/chat/x", headers=bearer(token(ADMIN))), 401,
                "token_invalid")


async def test_a_producer_id_belongs_to_its_publisher(tmp_path: Path) -> None:
    # Mallory, who may append to the shared session, names Alice's producer:
    # she gets a producer of her own, and cannot skip, fence or shadow Alice's
    # appends; the same holds once the table is rebuilt from the log.
    alice = {**bearer(token({"*": ["*"]}, sub="alice")), **TEXT}
    mallory = {**bearer(token({"shared": ["append"]}, sub="mallory")), **TEXT}

    async def post(who: dict[str, str], seq: int, body: bytes, epoch: int = 0) -> int:
        r = await http.post("/v1/stream/shared", content=body, headers={
            **who, **PRODUCER, "producer-seq": str(seq), "producer-epoch": str(epoch)})
        return r.status_code

    for restart in (False, True):
        data = tmp_path / "data"
        async with serve_in_process(data, auth=Authenticator(SECRET)) as s, \
                httpx.AsyncClient(base_url=s.http_url, timeout=30) as http:
            if not restart:
                assert (await http.put("/v1/stream/shared", headers=alice)).status_code == 201
                assert await post(alice, 0, b"a0") == 200
                assert await post(mallory, 1, b"EVIL") == 409          # her own producer: gap
                assert await post(mallory, 0, b"m0") == 200
                assert await post(mallory, 0, b"m0", epoch=5) == 200   # fences only herself
                assert await post(alice, 1, b"a1") == 200
            else:
                assert await post(alice, 1, b"a1") == 204              # a retry: duplicate
                assert await post(mallory, 0, b"m0", epoch=4) == 403   # stale for her
                assert await post(alice, 2, b"a2") == 200
            body = (await http.get("/v1/stream/shared", params={"offset": "-1"},
                                   headers=alice)).content
    assert body == b"a0m0m0a1a2"

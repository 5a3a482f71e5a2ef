"""Token auth from the command line: `broker token` and the auth flags of
`broker serve`, each run as a real process (as tests/test_serve.py does)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

SECRET = "0123456789abcdef0123456789abcdef-cli"
# No BROKER_* settings from the environment running the tests.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}


def broker(*args: str) -> list[str]:
    return [sys.executable, "-m", "broker", *args]


@contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[tuple[str, list[str]]]:
    """`broker serve --port 0` with ``args``; yields (base URL on 127.0.0.1, the
    stderr lines up to and including the 'listening on' line)."""
    proc = subprocess.Popen(broker("serve", "--port", "0", "--data-dir",
                                   str(tmp_path / "data"), *args),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stderr is not None
    lines: list[str] = []
    port = 0
    try:
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"listening on http://[^\s:]+:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "server did not report its port:\n" + "".join(lines)
        yield f"http://127.0.0.1:{port}", lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def refused_to_start(tmp_path: Path, *args: str) -> str:
    """Run `broker serve` expecting it to exit with an error; its stderr."""
    done = subprocess.run(broker("serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                                 *args), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=30, env=ENV)
    assert done.returncode != 0, done.stderr
    assert "listening on" not in done.stderr
    return done.stderr


def mint(*args: str) -> str:
    done = subprocess.run(broker("token", *args), capture_output=True, text=True, timeout=30,
                          env=ENV)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_minted_token_is_accepted_for_its_caps_only(tmp_path: Path) -> None:
    tok = mint("--sub", "alice", "--cap", "chat/*=read,append,create", "--secret", SECRET)
    with serving(tmp_path, "--auth-secret", SECRET) as (url, _), \
            httpx.Client(base_url=url, timeout=10) as http:
        auth = {"authorization": f"Bearer {tok}", "content-type": "text/plain"}
        assert http.put("/v1/stream/chat/x", headers=auth).status_code == 201
        assert http.post("/v1/stream/chat/x", headers=auth, content=b"hi").status_code == 204
        assert http.get("/v1/stream/chat/x", headers=auth).content == b"hi"
        r = http.put("/v1/stream/other/x", headers=auth)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = http.get("/v1/stream/chat/x")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        # Signed with another secret: refused.
        other = mint("--sub", "alice", "--cap", "*=*", "--secret", "x" * 32)
        r = http.get("/v1/stream/chat/x", headers={"authorization": f"Bearer {other}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "token_invalid"


def test_token_needs_a_valid_cap_and_a_long_secret() -> None:
    for args, says in ((["--cap", "chat/*=fly", "--secret", SECRET], "operations are"),
                       (["--cap", "chat/*", "--secret", SECRET], "GLOB=OP"),
                       (["--cap", "chat/*=read", "--secret", "short"], "at least 32 bytes")):
        done = subprocess.run(broker("token", "--sub", "a", *args), capture_output=True,
                              text=True, timeout=30, env=ENV)
        assert done.returncode != 0 and says in done.stderr, done.stderr


def test_off_loopback_without_auth_does_not_start(tmp_path: Path) -> None:
    err = refused_to_start(tmp_path, "--host", "0.0.0.0")
    assert "--insecure-no-auth" in err


def test_off_loopback_with_insecure_no_auth_starts(tmp_path: Path) -> None:
    with serving(tmp_path, "--host", "0.0.0.0", "--insecure-no-auth") as (url, lines), \
            httpx.Client(base_url=url, timeout=10) as http:
        assert any("listening on http://0.0.0.0:" in line for line in lines)
        assert any("token auth is off" in line for line in lines)
        assert http.put("/v1/stream/s").status_code == 201


def test_loopback_without_auth_starts_and_warns(tmp_path: Path) -> None:
    with serving(tmp_path) as (url, lines), httpx.Client(base_url=url, timeout=10) as http:
        warnings = [line for line in lines if "WARNING" in line]
        assert any("token auth is off" in line for line in warnings), lines
        assert http.put("/v1/stream/s").status_code == 201


def test_a_short_secret_is_refused(tmp_path: Path) -> None:
    err = refused_to_start(tmp_path, "--auth-secret", "too-short")
    assert "at least 32 bytes" in err
    assert "too-short" not in err             # the secret itself is never echoed


def test_ed25519_public_key(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    tok = mint("--sub", "bot", "--cap", "chat/*=*", "--private-key", str(private))
    hs = mint("--sub", "bot", "--cap", "*=*", "--secret", SECRET)
    with serving(tmp_path, "--auth-public-key", str(public)) as (url, _), \
            httpx.Client(base_url=url, timeout=10) as http:
        assert http.put("/v1/stream/chat/x",
                        headers={"authorization": f"Bearer {tok}"}).status_code == 201
        r = http.put("/v1/stream/other/x", headers={"authorization": f"Bearer {tok}"})
        assert r.status_code == 403
        # A broker with only a public key takes no HS256 token.
        r = http.get("/v1/stream/chat/x", headers={"authorization": f"Bearer {hs}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "token_invalid"
    assert "auth:" in refused_to_start(tmp_path, "--auth-public-key", str(tmp_path / "nope.pem"))

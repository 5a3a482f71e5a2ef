"""The token and capability core (broker/_auth.py), without sockets.  The
transports' use of it is tested in test_auth_http.py and test_ws_auth.py."""

from __future__ import annotations

import base64
import re
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given
from hypothesis import strategies as st

from broker._auth import (
    AuthError,
    Authenticator,
    Forbidden,
    Glob,
    mint,
    parse_cap_option,
    parse_caps,
)

SECRET = "s" * 32


def _model(pattern: str, text: str) -> bool:
    """What a glob means, said as a regular expression."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, text, re.DOTALL) is not None


@pytest.mark.parametrize("pattern, name, expected", [
    ("chat/u1/*", "chat/u1/a", True),
    ("chat/u1/*", "chat/u1/a/b", True),
    ("chat/u1/*", "chat/u1", False),
    ("chat/u1/*", "chat/u12/a", False),
    ("*", "anything/at/all", True),
    ("chat/?", "chat/a", False),            # only * is special
    ("chat/[ab]", "chat/a", False),
    ("org/*/team/*", "org/1/team/2", True),
    ("org/*/team/*", "org/1/team", False),
    ("a*a", "a", False),
    ("exact", "exact", True),
    ("exact", "exactly", False),
])
def test_glob(pattern: str, name: str, expected: bool) -> None:
    assert Glob(pattern).match(name) is expected


@given(st.text("ab/*", max_size=8), st.text("ab/", max_size=12))
def test_glob_agrees_with_its_model(pattern: str, name: str) -> None:
    assert Glob(pattern).match(name) == _model(pattern, name)


def test_a_hostile_name_against_many_stars_is_answered() -> None:
    # A regular expression of ".*" pieces backtracks exponentially here (one
    # check of a 252-character name against six stars ran for minutes); the
    # greedy matcher walks the name once per piece.
    assert not Glob("*a*a*a*a*a*a*b").match("a" * 5000)


def test_caps_are_checked_per_operation() -> None:
    token = mint("alice", {"chat/alice/*": ["read", "append"], "*": ["read"]}, secret=SECRET)
    who = Authenticator(SECRET).verify(token)
    assert who.sub == "alice"
    who.check("chat/alice/1", "append")
    who.check("elsewhere", "read")
    with pytest.raises(Forbidden) as exc:
        who.check("elsewhere", "append")
    assert exc.value.code == "forbidden" and exc.value.status == 403


@pytest.mark.parametrize("caps, why", [
    ([], "object"),
    ({"": ["read"]}, "non-empty"),
    ({"a": "read"}, "list"),
    ({"a": ["read", "write"]}, "unknown"),
])
def test_bad_caps_are_refused(caps: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_caps(caps)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Authenticator("short")


def test_expiry_and_not_before_follow_the_injected_clock() -> None:
    now = [1_000_000.0]
    auth = Authenticator(SECRET, clock=lambda: now[0])
    token = jwt.encode({"sub": "a", "exp": now[0] + 10, "nbf": now[0] + 5, "iat": now[0]},
                       SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match="not valid yet"):
        auth.verify(token)
    now[0] += 5
    assert auth.verify(token).seconds_left(now[0]) == 5
    now[0] += 5
    with pytest.raises(AuthError) as exc:
        auth.verify(token)
    assert exc.value.code == "token_expired"


@pytest.mark.parametrize("claims, code", [
    ({"exp": 2**40}, "token_invalid"),                       # no sub
    ({"sub": "a"}, "token_invalid"),                         # no exp
    ({"sub": "", "exp": 2**40}, "token_invalid"),
    ({"sub": "a" * 257, "exp": 2**40}, "token_invalid"),
    ({"sub": "a", "exp": "never"}, "token_invalid"),
    ({"sub": "a", "exp": float("nan")}, "token_invalid"),     # never >= now: would never expire
    ({"sub": "a", "exp": float("inf")}, "token_invalid"),     # a token without an expiry
    ({"sub": "a", "exp": 10**400}, "token_invalid"),         # too big for a float
    ({"sub": "a", "exp": 2**40, "nbf": float("nan")}, "token_invalid"),
    ({"sub": "a", "exp": 2**40, "nbf": -10**400}, "token_invalid"),
    ({"sub": "a", "exp": 2**40, "caps": {"x": ["fly"]}}, "token_invalid"),
    ({"sub": "a", "exp": 1}, "token_expired"),
])
def test_bad_claims(claims: dict[str, object], code: str) -> None:
    with pytest.raises(AuthError) as exc:
        Authenticator(SECRET).verify(jwt.encode(claims, SECRET, algorithm="HS256"))
    assert exc.value.code == code


def test_a_header_nested_too_deeply_is_invalid() -> None:
    """Parsed before any signature check, so anyone can send one: PyJWT
    before 2.14 (pyproject allows 2.8) raised RecursionError from it."""
    header = base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode()
    with pytest.raises(AuthError) as exc:
        Authenticator(SECRET).verify(f"{header}.e30.x")
    assert exc.value.code == "token_invalid"


def test_a_public_key_verifies_only_its_own_algorithm() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    private_pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    auth = Authenticator(public_key_pem=pem)
    assert list(auth.algorithms) == ["EdDSA"]
    assert auth.verify(mint("a", {"*": ["*"]}, private_key_pem=private_pem)).sub == "a"
    # An HS256 token is refused outright: no secret is configured, so the
    # public key is never tried as one.
    forged = jwt.encode({"sub": "a", "exp": time.time() + 60}, "k" * 32, algorithm="HS256")
    with pytest.raises(AuthError, match="HS256"):
        auth.verify(forged)


def test_open_when_no_key() -> None:
    auth = Authenticator()
    assert not auth.enabled
    who = auth.verify(None)
    assert who.sub is None and who.allows("any/thing", "delete")


@pytest.mark.parametrize("text, parsed", [
    ("chat/*=read,append", ("chat/*", ["read", "append"])),
    ("a=b=*", ("a=b", ["*"])),
])
def test_cap_option(text: str, parsed: tuple[str, list[str]]) -> None:
    assert parse_cap_option(text) == parsed


@pytest.mark.parametrize("text", ["chat/*", "=read", "chat/*=", "chat/*=fly"])
def test_bad_cap_option(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cap_option(text)

"""Tokens and capabilities: who may touch which session, and how.

Theory of operation
-------------------
A token is a JWT (PyJWT).  The broker verifies it with a shared secret
(HS256) or a public key (EdDSA, RS256 or ES256, chosen by the key's type),
never anything else: the algorithm is taken from the token's header only to
pick which of the configured keys to check it with, so ``alg: none`` and a
public key used as an HMAC secret are refused before any signature check.

Claims:

* ``sub``: the client id.  It is stamped as the publisher of every record the
  client publishes, whatever the client says about itself.
* ``exp``: required.  A token without an expiry is refused.
* ``caps``: ``{glob: [operation, ...]}``.  A glob is matched against the whole
  session name; ``*`` matches any run of characters, ``/`` included, and every
  other character matches itself.  The operations are ``read``, ``append``,
  ``signal``, ``create``, ``delete``, and ``*`` for all of them.  A token may
  hold several globs; an operation is allowed if any glob that matches the
  session grants it.

``Principal.check`` is what every transport calls before it looks a session
up, so a refusal (403) never says whether the session exists.

With no key configured the broker runs open: ``Authenticator.verify`` gives
every caller the ``OPEN`` principal, which may do everything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

READ, APPEND, SIGNAL, CREATE, DELETE = "read", "append", "signal", "create", "delete"
OPERATIONS = frozenset({READ, APPEND, SIGNAL, CREATE, DELETE})
ALL = "*"
MAX_TOKEN_BYTES = 8 * 1024
MIN_SECRET_BYTES = 32
MAX_SUB_BYTES = 256          # the same bound as a WebSocket client id


class AuthError(Exception):
    """No token, or a token that does not verify: HTTP 401 or an error frame."""

    status = 401

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Forbidden(Exception):
    """A valid token without the capability: HTTP 403 or an error frame.
    The message names the operation and the session as the client gave it,
    and says nothing about whether that session exists."""

    status = 403
    code = "forbidden"

    def __init__(self, operation: str, session: str) -> None:
        self.message = f"the token does not allow {operation} on {session!r}"
        super().__init__(self.message)
        self.operation = operation
        self.session = session


@dataclass(frozen=True, slots=True)
class Glob:
    """A capability glob: ``*`` matches any run of characters, ``/`` included,
    and everything else matches itself.  Matched greedily left to right, which
    is exact for stars alone and takes time linear in the name times the
    pattern (a regular expression of ``.*`` pieces can backtrack
    exponentially on a hostile name)."""

    pattern: str

    def match(self, text: str) -> bool:
        first, *middle = self.pattern.split("*")
        if not middle:
            return text == first
        last = middle.pop()
        if (len(text) < len(first) + len(last) or not text.startswith(first)
                or not text.endswith(last)):
            return False
        pos, end = len(first), len(text) - len(last)
        for part in middle:
            i = text.find(part, pos, end)
            if i < 0:
                return False
            pos = i + len(part)
        return True


@dataclass(frozen=True, slots=True)
class Principal:
    """Who the caller is and what it may do.  ``sub`` None and no ``exp`` is
    the open principal of a broker without auth."""

    sub: str | None
    exp: float | None
    caps: tuple[tuple[Glob, frozenset[str]], ...]
    everything: bool = False

    def allows(self, session: str, operation: str) -> bool:
        if self.everything:
            return True
        for pattern, ops in self.caps:
            if (ALL in ops or operation in ops) and pattern.match(session):
                return True
        return False

    def check(self, session: str, operation: str) -> None:
        """Raise ``Forbidden`` unless the token allows ``operation`` on ``session``."""
        if not self.allows(session, operation):
            raise Forbidden(operation, session)

    def seconds_left(self, now: float | None = None) -> float:
        """Until expiry; infinite for a token (or an open broker) without one."""
        if self.exp is None:
            return float("inf")
        return self.exp - (time.time() if now is None else now)


OPEN = Principal(None, None, (), everything=True)


def parse_caps(raw: object) -> tuple[tuple[Glob, frozenset[str]], ...]:
    """Validate a ``caps`` claim; ``ValueError`` says what is wrong with it."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ValueError("caps must be an object of glob -> [operations]")
    caps = []
    for pattern, ops in raw.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("a caps glob must be a non-empty string")
        if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
            raise ValueError(f"caps[{pattern!r}] must be a list of operations")
        unknown = set(ops) - OPERATIONS - {ALL}
        if unknown:
            raise ValueError(f"caps[{pattern!r}] has unknown operations {sorted(unknown)}")
        caps.append((Glob(pattern), frozenset(ops)))
    return tuple(caps)


def _public_algorithm(key: Any) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES256"
    raise ValueError(f"unsupported public key type {type(key).__name__}: "
                     "use Ed25519, RSA or EC P-256")


class Authenticator:
    """Verifies tokens.  ``enabled`` is False when no key is configured, and
    then every caller is ``OPEN``."""

    def __init__(self, secret: str | bytes | None = None, public_key_pem: bytes | None = None,
                 *, leeway_s: float = 0.0, clock: Callable[[], float] = time.time) -> None:
        self._keys: dict[str, Any] = {}
        if secret:
            raw = secret.encode() if isinstance(secret, str) else secret
            if len(raw) < MIN_SECRET_BYTES:
                raise ValueError(f"an HS256 secret must be at least {MIN_SECRET_BYTES} bytes "
                                 "(RFC 7518, section 3.2)")
            self._keys["HS256"] = raw
        if public_key_pem:
            key = serialization.load_pem_public_key(public_key_pem)
            self._keys[_public_algorithm(key)] = key
        self.leeway_s = leeway_s
        self.clock = clock

    @classmethod
    def from_options(cls, secret: str | None, public_key_file: str | None) -> Authenticator:
        pem = None
        if public_key_file:
            with open(public_key_file, "rb") as f:
                pem = f.read()
        return cls(secret, pem)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def algorithms(self) -> Iterable[str]:
        return tuple(self._keys)

    def verify(self, token: str | None) -> Principal:
        """The principal a token stands for; ``AuthError`` if it does not verify."""
        if not self.enabled:
            return OPEN
        if not token:
            raise AuthError("unauthorized", "a token is required")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token_invalid", "the token is too long")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise AuthError("token_invalid", f"malformed token: {exc}") from None
        except RecursionError:
            # JSON nested too deeply for Python's parser: PyJWT before 2.14
            # lets this through, from a header nobody has signed.
            raise AuthError("token_invalid", "malformed token: nested too deeply") from None
        key = self._keys.get(alg) if isinstance(alg, str) else None
        if key is None or not isinstance(alg, str):
            raise AuthError("token_invalid",
                            f"tokens signed with {alg!r} are not accepted here")
        try:
            claims = jwt.decode(token, key, algorithms=[alg], leeway=self.leeway_s,
                                options={"require": ["exp", "sub"], "verify_exp": False,
                                         "verify_iat": False, "verify_nbf": False})
        except jwt.PyJWTError as exc:
            raise AuthError("token_invalid", f"the token does not verify: {exc}") from None
        except RecursionError:
            raise AuthError("token_invalid", "malformed token: nested too deeply") from None
        return self._principal(claims)

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub.encode()) > MAX_SUB_BYTES:
            raise AuthError("token_invalid", f"sub must be a string of 1 to {MAX_SUB_BYTES} bytes")
        exp = _seconds(claims, "exp")
        if exp is None:
            raise AuthError("token_invalid", "exp must be a number")
        now = self.clock()
        if now >= exp + self.leeway_s:
            raise AuthError("token_expired", "the token has expired")
        nbf = _seconds(claims, "nbf")
        if nbf is not None and now < nbf - self.leeway_s:
            raise AuthError("token_invalid", "the token is not valid yet (nbf)")
        try:
            caps = parse_caps(claims.get("caps"))
        except ValueError as exc:
            raise AuthError("token_invalid", str(exc)) from None
        return Principal(sub, exp + self.leeway_s, caps)


def _seconds(claims: Mapping[str, Any], name: str) -> float | None:
    """A time claim as a finite float; None if absent.  JSON as Python reads
    it has NaN, Infinity and integers too big for a float: each would make a
    token that never expires, or a comparison that raises."""
    value = claims.get(name)
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ValueError
        return float(value)
    except (ValueError, OverflowError):
        raise AuthError("token_invalid", f"{name} must be a number") from None


def mint(sub: str, caps: Mapping[str, list[str]], *, ttl_s: float = 3600.0,
         secret: str | bytes | None = None, private_key_pem: bytes | None = None,
         now: float | None = None) -> str:
    """A signed token, for development (``broker token``) and tests."""
    parse_caps(caps)
    issued = int(time.time() if now is None else now)
    claims = {"sub": sub, "iat": issued, "exp": issued + int(ttl_s), "caps": dict(caps)}
    if private_key_pem is not None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if not isinstance(key, (ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey,
                                ec.EllipticCurvePrivateKey)):
            raise ValueError(f"unsupported private key type {type(key).__name__}: "
                             "use Ed25519, RSA or EC P-256")
        return jwt.encode(claims, key, algorithm=_public_algorithm(key.public_key()))
    if not secret:
        raise ValueError("mint needs a secret or a private key")
    return jwt.encode(claims, secret.encode() if isinstance(secret, str) else secret,
                      algorithm="HS256")


def parse_cap_option(text: str) -> tuple[str, list[str]]:
    """``'chat/*=read,append'`` -> ``('chat/*', ['read', 'append'])``."""
    glob, sep, ops = text.rpartition("=")
    if not sep or not glob:
        raise ValueError(f"a capability is GLOB=OP[,OP...], not {text!r}")
    parsed = [op.strip() for op in ops.split(",") if op.strip()]
    unknown = set(parsed) - OPERATIONS - {ALL}
    if not parsed or unknown:
        raise ValueError(f"{text!r}: operations are read, append, signal, create, delete or *")
    return glob, parsed

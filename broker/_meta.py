"""Session metadata, and how session names become directory names.

Each session directory holds ``meta.json`` beside its segment files.  It is
small, changes rarely (create, close), and is replaced atomically, so a crash
leaves either the old or the new version.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ._errors import InvalidSessionName

META_FILE = "meta.json"
MAX_NAME_BYTES = 1024
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidSessionName("a session name must be a non-empty string")
    if "\x00" in name:
        raise InvalidSessionName("a session name must not contain NUL")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidSessionName(f"a session name must be at most {MAX_NAME_BYTES} bytes")


def media_type(content_type: str | None) -> str:
    """``Text/Plain; charset=utf-8`` -> ``text/plain``: content types compare
    without parameters and case-insensitively."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def is_json_text(data: bytes) -> bool:
    """Whether ``data`` is exactly one JSON value in UTF-8 (RFC 8259): no
    NaN or Infinity, no byte-order mark, no other encoding, no lone surrogate
    escapes.  What a JSON session stores must be valid as it is."""
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
        if "\\u" in text:
            json.dumps(value, ensure_ascii=False).encode()   # refuses "\ud800"
    except (ValueError, UnicodeError):
        return False
    return True


def dir_name(name: str) -> str:
    """A file name for the session: only [A-Za-z0-9_-] and %XX escapes.

    No name can map to ``.``, ``..`` or contain a separator, so the result
    always stays inside the sessions directory.  Names whose escaped form is too
    long for a file name are hashed instead (the real name is in meta.json).
    """
    raw = name.encode("utf-8", "surrogatepass")
    out = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)
    if len(out) > 200:
        out = "h_" + hashlib.sha256(raw).hexdigest()
    return out


@dataclass(frozen=True, slots=True)
class SessionMeta:
    name: str
    epoch: int                                 # incarnation: new on every create
    content_type: str = "application/octet-stream"
    created_at: float = 0.0                    # Unix seconds
    ttl_s: float | None = None                 # idle lifetime: expires ttl_s after last use
    expires_at: float | None = None            # absolute expiry, Unix seconds
    closed: bool = False                       # no more appends
    extra: dict[str, Any] = field(default_factory=dict)  # for transports' own state

    def expiry(self, last_access: float | None = None) -> float | None:
        """When the session expires: ``expires_at``, or ``ttl_s`` after the last
        access (a sliding window; the creation time if never accessed)."""
        base = self.created_at if last_access is None else last_access
        deadlines = [t for t in (self.expires_at,
                                 None if self.ttl_s is None else base + self.ttl_s)
                     if t is not None]
        return min(deadlines) if deadlines else None

    def expired(self, now: float | None = None, last_access: float | None = None) -> bool:
        exp = self.expiry(last_access)
        return exp is not None and (time.time() if now is None else now) >= exp

    def with_(self, **changes: Any) -> SessionMeta:
        return replace(self, **changes)

    def to_json(self) -> bytes:
        return json.dumps({"format": 1, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SessionMeta:
        d = json.loads(data)
        d.pop("format", None)
        return cls(**d)


def load_meta(directory: str) -> SessionMeta | None:
    try:
        with open(os.path.join(directory, META_FILE), "rb") as f:
            return SessionMeta.from_json(f.read())
    except FileNotFoundError:
        return None

"""Session metadata, and how session names become directory names.

Each session directory holds ``meta.json`` beside its segment files.  It is
small, changes rarely (create, close), and is replaced atomically, so a crash
leaves either the old or the new version.

Names
-----
A session name arrives from a URL path or a WebSocket frame and becomes a
directory under ``data_dir/sessions``.  Two independent lines of defence keep
it there:

1. ``check_name``, the rule every transport and the Python API share: 1 to
   255 bytes of ASCII letters, digits and ``- _ . ~ : @ + = ,``, in
   ``/``-separated segments; no empty segment, no segment ending in ``.``
   (which rules out ``.`` and ``..``), no segment that Windows reserves for
   a device (``CON``, ``nul.txt``...).  Only ASCII: that leaves nothing for
   homoglyphs, fullwidth solidi, direction overrides or Unicode normalization
   to play with, and a name reads the same in a log, a URL and a token's
   capability glob.  The rule is strict on purpose: loosening it later breaks
   nobody, tightening it would.
2. ``dir_name``, which maps *any* string, valid or not, to one path
   component of ``[A-Za-z0-9_-]`` and ``%XX`` escapes, so it can never be
   ``.``, ``..``, empty, absolute, or hold a separator or NUL, whatever a
   future caller forgets to check.  Distinct names get distinct components.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ._errors import InvalidSessionName

META_FILE = "meta.json"
MAX_NAME_BYTES = 255
NAME_PUNCTUATION = "-_.~:@+=,"          # besides letters, digits and the separator /
_BAD_CHAR = re.compile(r"[^A-Za-z0-9/" + re.escape(NAME_PUNCTUATION) + r"]")
# A device name with or without an extension: Windows opens the device instead.
_DEVICE = re.compile(r"(?:con|prn|aux|nul|com[0-9]|lpt[0-9])(?:\..*)?", re.IGNORECASE)
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_MAX_DIR_NAME = 200
_HASHED = re.compile(r"h_[0-9a-f]{64}")


def _show(name: str) -> str:
    """The name for an error message: a hostile one may be long or unprintable."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def check_name(name: object) -> None:
    """Raise InvalidSessionName unless ``name`` follows the rule (module docstring)."""
    if not isinstance(name, str) or not name:
        raise InvalidSessionName("a session name must be a non-empty string")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise InvalidSessionName(
            f"a session name must be at most {MAX_NAME_BYTES} bytes, not {size}")
    bad = _BAD_CHAR.search(name)
    if bad is not None:
        raise InvalidSessionName(
            f"a session name may hold only ASCII letters, digits, / and "
            f"{' '.join(NAME_PUNCTUATION)}; {bad.group()!r} at position {bad.start()} of "
            f"{_show(name)} is not allowed")
    for segment in name.split("/"):
        if not segment:
            raise InvalidSessionName(
                f"session name {_show(name)} has an empty segment: it must not start or end "
                f"with / or contain //")
        if segment.endswith("."):
            raise InvalidSessionName(
                f"session name {_show(name)} has the segment {_show(segment)}: a segment must not "
                f"be . or .. or end with a dot")
        if _DEVICE.fullmatch(segment):
            raise InvalidSessionName(
                f"session name {_show(name)} has the segment {_show(segment)}, a Windows device "
                f"name (CON, PRN, AUX, NUL, COM0-9, LPT0-9)")


def media_type(content_type: str | None) -> str:
    """``Text/Plain; charset=utf-8`` -> ``text/plain``: content types compare
    without parameters and case-insensitively."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def reject_json_constant(name: str) -> Any:
    """``parse_constant`` for ``json.loads``: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


def is_json_text(data: bytes) -> bool:
    """Whether ``data`` is exactly one JSON value in UTF-8 (RFC 8259): no
    NaN or Infinity, no byte-order mark, no other encoding, no lone surrogate
    escapes.  What a JSON session stores must be valid as it is."""
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=reject_json_constant)
        if "\\u" in text:
            json.dumps(value, ensure_ascii=False).encode()   # refuses "\ud800"
    except (ValueError, UnicodeError, RecursionError):   # too deep for Python's parser
        return False
    return True


def dir_name(name: str) -> str:
    """The session's directory name: one path component, for any string.

    Bytes of [A-Za-z0-9_-] are kept and every other byte of the UTF-8 form
    becomes ``%XX``, so no name can map to ``.``, ``..`` or contain a
    separator, and distinct names map apart.  A name whose escaped form is
    empty or longer than 200 characters is stored as ``h_<sha256>`` instead
    (the real name is in meta.json); a name that would escape to exactly that
    shape gets its ``h`` escaped, so no name can land in another's hashed
    directory.
    """
    raw = name.encode("utf-8", "surrogatepass")
    out = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)
    if not out or len(out) > _MAX_DIR_NAME:
        return "h_" + hashlib.sha256(raw).hexdigest()
    if _HASHED.fullmatch(out):
        return "%68" + out[1:]
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

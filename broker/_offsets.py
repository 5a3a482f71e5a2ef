"""Offsets as text, the same on every transport (docs/protocol.md, "Offsets").

An HTTP offset is ``<16 digits>_<16 digits>``: the part before ``_`` is
reserved (always zero), the part after it is the record offset, zero-padded
so offsets sort as strings.  Readers may also say ``-1`` (the oldest record)
or ``now`` (the current end).
"""

from __future__ import annotations

import re

from ._session import NOW, START

HTTP_OFFSET_RE = re.compile(r"([0-9]{1,20})_([0-9]{1,20})")


def format_offset(offset: int) -> str:
    return f"{0:016d}_{offset:016d}"


def parse_offset_text(text: str) -> int | None:
    """``-1``, ``now`` or an HTTP offset -> START, NOW or the record offset;
    None if ``text`` is none of them (or its reserved part is not zero)."""
    if text == "-1":
        return START
    if text == "now":
        return NOW
    m = HTTP_OFFSET_RE.fullmatch(text)
    if m is None or int(m.group(1)) != 0:
        return None
    return int(m.group(2))

"""The descriptor cache (broker/_files.py)."""

from __future__ import annotations

import os
from pathlib import Path

from broker._files import FileCache


def test_pins_beyond_the_cap_stay_open(tmp_path: Path) -> None:
    # Pinned descriptors belong to worker threads; the one being handed out
    # must never be the one evicted, even when every other one is pinned.
    cache = FileCache(2)
    paths = [str(tmp_path / f"f{i}") for i in range(5)]
    fds = [cache.pin(p) for p in paths]
    for fd in fds:
        os.fstat(fd)                     # EBADF if the cache closed it
    assert len(cache) == 5
    plain = cache.fd(str(tmp_path / "plain"))
    os.fstat(plain)
    for p in paths:
        cache.unpin(p)
    assert len(cache) == 2
    cache.close_all()


def test_the_least_recently_used_is_closed(tmp_path: Path) -> None:
    cache = FileCache(2)
    a, b, c = (str(tmp_path / n) for n in "abc")
    cache.fd(a)
    cache.fd(b)
    cache.fd(a)                          # b is now the oldest
    cache.fd(c)
    assert len(cache) == 2
    assert cache.fd(a) == cache.fd(a)    # still cached
    cache.close_all()

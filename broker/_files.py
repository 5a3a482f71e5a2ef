"""File plumbing: a broker-wide cache of open descriptors, and atomic writes.

Theory of operation
-------------------
A broker may hold thousands of sessions, each with several segment files, but a
process has a file-descriptor limit (often 1,024).  Segment logs therefore
never own descriptors: they ask the FileCache for one by path each time.  The
cache keeps at most ``max_open`` descriptors, closing the least recently used.
A descriptor handed to a worker thread (fsync) is *pinned* until the thread is
done, so it is never closed, or its number reused, under the thread's feet.

Closing a descriptor never loses data: dirty pages belong to the file, not the
descriptor, and a later fsync through a new descriptor flushes them.
"""

from __future__ import annotations

import os
from collections import OrderedDict


class FileCache:
    def __init__(self, max_open: int) -> None:
        self.max_open = max_open
        self._fds: OrderedDict[str, int] = OrderedDict()  # path -> fd, oldest first
        self._pins: dict[str, int] = {}                   # path -> pin count

    def __len__(self) -> int:
        return len(self._fds)

    def fd(self, path: str) -> int:
        """A read-write descriptor for ``path``, creating the file if needed."""
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._fds[path] = fd
        self._evict(keep=path)
        return fd

    def pin(self, path: str) -> int:
        fd = self.fd(path)
        self._pins[path] = self._pins.get(path, 0) + 1
        return fd

    def unpin(self, path: str) -> None:
        n = self._pins[path] - 1
        if n:
            self._pins[path] = n
        else:
            del self._pins[path]
            self._evict()

    def _evict(self, keep: str | None = None) -> None:
        """Close the least recently used descriptors down to ``max_open``,
        sparing pinned ones and ``keep`` (the one being handed out): when
        everything else is pinned the cache goes over its cap for a while."""
        if len(self._fds) <= self.max_open:
            return
        for path in list(self._fds):
            if len(self._fds) <= self.max_open:
                break
            if path not in self._pins and path != keep:
                os.close(self._fds.pop(path))

    def close(self, path: str) -> None:
        """Forget ``path`` (its file is about to be removed or left idle)."""
        if path in self._pins:
            raise RuntimeError(f"{path} is in use by a worker thread")
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file.

    With ``durable`` False (the ``never`` fsync policy) nothing is fsynced: the
    rename still makes the swap atomic for other processes, not across a
    machine crash.
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")

"""``broker serve`` as a child process, for tests that need the real command."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

_LISTENING = re.compile(r"listening on https?://127\.0\.0\.1:(\d+)")


@contextlib.contextmanager
def serving(data_dir: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Start ``broker serve --port 0`` on ``data_dir`` with ``flags``; yield
    the process and the port it reports.  Its stderr is drained by a thread
    once the port is known, so its logging never blocks it; the process is
    killed on the way out if it is still running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--port", "0", "--data-dir", str(data_dir),
         *flags], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    port = 0
    for line in proc.stderr:
        if m := _LISTENING.search(line):
            port = int(m.group(1))
            break
    drain = threading.Thread(target=proc.stderr.read, daemon=True)
    drain.start()
    try:
        assert port, "the server did not report its port"
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        drain.join(10)
        proc.stderr.close()

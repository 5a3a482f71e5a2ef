"""The README's examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_embedding_example_runs(tmp_path: Path) -> None:
    (code,) = [c for c in _examples() if "open_broker" in c]
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:3] == ["0 b'hello'", "1 b'a'", "2 b'b'"]


def _run_against_broker_serve(tmp_path: Path, code: str) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--port", "0",
                             "--data-dir", str(tmp_path / "data")],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = next(m.group(1) for line in proc.stderr
                    if (m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)))
        script = tmp_path / "example.py"
        script.write_text(code.replace("127.0.0.1:4437", f"127.0.0.1:{port}"))
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60,
                             env={**os.environ, "PYTHONWARNINGS": "error"})
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


def test_asyncio_agent_example_runs_against_broker_serve(tmp_path: Path) -> None:
    (code,) = [c for c in _examples() if "asyncio.run" in c]
    assert _run_against_broker_serve(tmp_path, code) == [
        "signal cancel stop, please", "The answer is 42."]


def test_websocket_example_runs_against_broker_serve(tmp_path: Path) -> None:
    (code,) = [c for c in _examples() if "trio.run" in c and "client.connect" in c]
    assert _run_against_broker_serve(tmp_path, code) == [
        "offsets 0 to 1", "0 0 agent-1 b'Hel'", "1 0 agent-1 b'lo'",
        "2 1 agent-1 b'cancel'", "resume later from 3 epoch 1"]

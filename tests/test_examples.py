"""The examples in examples/ run end to end against a real broker: in this
process under Trio (imported, as a library user would), and as the scripts
they are against ``broker serve`` (under asyncio, and Trio with --trio)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from _serveproc import serving
from conftest import Served

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def check_scripted(lines: list[str]) -> None:
    """What the scripted agent's conversation looks like, whatever the timing."""
    assert lines[:3] == [
        "user: What is the tide at Brest today?",
        "assistant [complete]: Let me look at the tide table for Brest.",
        'tool tide_table {"port":"Brest"} approved=True [complete] -> '
        '{"high":"06:12","low":"12:25"}']
    assert lines[3].startswith("assistant [cancelled]: High tide at Brest is at 06:12")
    assert len(lines) == 4


def run_script(name: str, *args: str, env: dict[str, str] | None = None,
               tmp_path: Path) -> list[str]:
    with serving(tmp_path / "data") as (_, port):
        out = subprocess.run(
            [sys.executable, str(EXAMPLES / f"{name}.py"), f"ws://127.0.0.1:{port}/v1/ws",
             *args],
            capture_output=True, text=True, timeout=60,
            env={**(env or os.environ), "PYTHONWARNINGS": "error"})
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


async def test_scripted_agent_in_process(served: Served) -> None:
    check_scripted(await load("scripted_agent").main(served.ws_url, delay=0.002))


@pytest.mark.parametrize("flags", [(), ("--trio",)])
def test_scripted_agent_script(tmp_path: Path, flags: tuple[str, ...]) -> None:
    check_scripted(run_script("scripted_agent", *flags, tmp_path=tmp_path))


EXPECTED = ["complete: The tide at Brest turns about every six hours, twice a day."]


async def test_openai_agent_without_a_key_in_process(served: Served,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert await load("openai_agent").main(served.ws_url) == EXPECTED


def test_openai_agent_script_without_a_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    assert run_script("openai_agent", env=env, tmp_path=tmp_path) == EXPECTED


def test_the_agent_doc_quick_start_runs(tmp_path: Path) -> None:
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", (ROOT / "docs/agent.md").read_text(),
                                     re.S) if "anyio.run(main)" in c]
    script = tmp_path / "quick_start.py"
    with serving(tmp_path / "data") as (_, port):
        script.write_text(code.replace("127.0.0.1:4437", f"127.0.0.1:{port}"))
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["user: hello", "assistant: You said: hello"]

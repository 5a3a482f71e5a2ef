"""The Durable Streams conformance suite, run against a real `broker serve`.

The suite is the npm package @durable-streams/server-conformance-tests, run
by vitest from conformance/ (see docs/conformance.md).  This test installs its
npm dependencies when they are missing, starts `broker serve --port 0` on a
temporary data dir, runs vitest with the JSON reporter and compares the
per-case results with conformance/known-failures.txt, a ratchet:

* a failing case that is not on the list is a regression: the test fails;
* a listed case that now passes must come off the list: the test fails and
  names it, so the list only ever shrinks.

``CONFORMANCE_UPDATE_KNOWN_FAILURES=prune`` removes the listed cases that now
pass (and names the suite no longer has) instead of failing on them;
``=rewrite`` writes the list anew from this run, accepting whatever fails
now (for a new suite version; review the diff).  Under ``prune``,
regressions still fail the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE_DIR = ROOT / "conformance"
KNOWN_FAILURES = SUITE_DIR / "known-failures.txt"

# The server's long-poll wait, and the bound the suite is told about: it gives
# each long-poll case LONG_POLL_BOUND_MS + 1 s, and other cases vitest's
# testTimeout (5 s, conformance/vitest.config.mjs).
SERVER_LONG_POLL_MS = 500
LONG_POLL_BOUND_MS = 3000
VITEST_TIMEOUT_S = 240

KNOWN_FAILURES_HEADER = """\
# Conformance cases that fail against `broker serve` today, one full name a
# line ("Describe > [Describe >] case"), as tests/test_conformance.py prints them.
# A ratchet: a failure not listed here fails the test, and so does a listed
# case that passes, so this list only shrinks. See docs/conformance.md.
"""


def _tool_missing() -> str | None:
    missing = [t for t in ("node", "npm") if shutil.which(t) is None]
    return f"{' and '.join(missing)} not on PATH: the conformance suite runs on Node" \
        if missing else None


def _deps_installed() -> bool:
    """True when every pinned dependency is in node_modules at its pinned version."""
    pinned = json.loads((SUITE_DIR / "package.json").read_text())["dependencies"]
    for name, version in pinned.items():
        manifest = SUITE_DIR / "node_modules" / name / "package.json"
        try:
            if json.loads(manifest.read_text())["version"] != version:
                return False
        except (OSError, ValueError, KeyError):
            return False
    return True


def _ensure_npm_deps() -> None:
    if _deps_installed():
        return
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=SUITE_DIR, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=600, check=False)
    if done.returncode != 0 or not _deps_installed():
        pytest.fail(f"`npm ci` in {SUITE_DIR} failed (exit {done.returncode}):\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _serve_supports(flag: str) -> bool:
    done = subprocess.run([sys.executable, "-m", "broker", "serve", "--help"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, check=False)
    return flag in done.stdout


def _start_server(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`broker serve --port 0`, its stderr going to a file (never a full pipe)."""
    log_path = tmp_path / "broker.log"
    cmd = [sys.executable, "-m", "broker", "serve", "--port", "0",
           "--data-dir", str(tmp_path / "data")]
    if _serve_supports("--long-poll-timeout-ms"):
        cmd += ["--long-poll-timeout-ms", str(SERVER_LONG_POLL_MS)]
    env = {**os.environ, "BROKER_LONG_POLL_TIMEOUT_MS": str(SERVER_LONG_POLL_MS)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(rb"listening on http://127\.0\.0\.1:(\d+)", log_path.read_bytes())
        if m:
            return proc, int(m.group(1)), log_path
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    _stop_server(proc)
    pytest.fail("broker serve did not report its port:\n"
                + log_path.read_text(errors="replace")[-3000:])


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _run_suite(base_url: str, tmp_path: Path) -> tuple[dict[str, str], dict[str, str], Path]:
    """Run vitest; return {case: status}, {case: first failure message} and the log path."""
    results = tmp_path / "results.json"
    log_path = tmp_path / "vitest.log"
    env = {**os.environ, "CONFORMANCE_BASE_URL": base_url,
           "CONFORMANCE_LONG_POLL_TIMEOUT_MS": str(LONG_POLL_BOUND_MS), "NO_COLOR": "1"}
    env.pop("FORCE_COLOR", None)
    with open(log_path, "wb") as log:
        try:
            subprocess.run(
                ["node", str(SUITE_DIR / "node_modules" / "vitest" / "vitest.mjs"), "run",
                 "--reporter=default", "--reporter=json", f"--outputFile.json={results}"],
                cwd=SUITE_DIR, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                timeout=VITEST_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vitest ran past {VITEST_TIMEOUT_S} s; its output is in {log_path}")
    if not results.exists():
        pytest.fail("vitest wrote no JSON report:\n"
                    + log_path.read_text(errors="replace")[-3000:])
    statuses: dict[str, str] = {}
    messages: dict[str, str] = {}
    for file_result in json.loads(results.read_text())["testResults"]:
        for case in file_result["assertionResults"]:
            name = " > ".join([*case["ancestorTitles"], case["title"]])
            statuses[name] = case["status"]
            if case.get("failureMessages"):
                messages[name] = case["failureMessages"][0].strip().splitlines()[0][:300]
    if not statuses:
        pytest.fail("vitest reported no cases:\n" + log_path.read_text(errors="replace")[-3000:])
    return statuses, messages, log_path


def _read_known_failures() -> list[str]:
    if not KNOWN_FAILURES.exists():
        return []
    return [line.strip() for line in KNOWN_FAILURES.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _write_known_failures(names: list[str]) -> None:
    KNOWN_FAILURES.write_text(KNOWN_FAILURES_HEADER + "".join(f"{n}\n" for n in names))


def test_conformance_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reason = _tool_missing()
    if reason:
        pytest.skip(reason)
    _ensure_npm_deps()

    started = time.monotonic()
    proc, port, server_log = _start_server(tmp_path)
    try:
        statuses, messages, vitest_log = _run_suite(f"http://127.0.0.1:{port}", tmp_path)
    finally:
        _stop_server(proc)
    elapsed = time.monotonic() - started

    failed = [n for n, s in statuses.items() if s == "failed"]
    passed = [n for n, s in statuses.items() if s == "passed"]
    skipped = len(statuses) - len(failed) - len(passed)
    known = _read_known_failures()
    known_set = set(known)
    regressions = [n for n in failed if n not in known_set]
    now_passing = [n for n in known if statuses.get(n) == "passed"]
    unknown = [n for n in known if n not in statuses]

    mode = os.environ.get("CONFORMANCE_UPDATE_KNOWN_FAILURES", "")
    if mode == "rewrite":
        _write_known_failures(failed)
        regressions = []
    elif mode == "prune" and (now_passing or unknown):
        drop = set(now_passing) | set(unknown)
        _write_known_failures([n for n in known if n not in drop])

    with capsys.disabled():
        print(f"\nconformance: {len(passed)} passed, {len(failed)} failed, {skipped} skipped "
              f"of {len(statuses)} cases in {elapsed:.1f} s "
              f"({len(known)} listed as known failures; vitest log {vitest_log}, "
              f"server log {server_log})")
        if mode in ("rewrite", "prune"):
            print(f"conformance: {KNOWN_FAILURES.relative_to(ROOT)} updated ({mode})")

    problems = []
    if regressions:
        problems.append(
            f"{len(regressions)} case(s) fail that are not in {KNOWN_FAILURES.name} "
            "(regressions):\n" + "\n".join(f"  {n}\n      {messages.get(n, '')}"
                                           for n in regressions))
    if mode not in ("rewrite", "prune"):
        if now_passing:
            problems.append(
                f"{len(now_passing)} case(s) in {KNOWN_FAILURES.name} now pass: remove these "
                "lines (or rerun with CONFORMANCE_UPDATE_KNOWN_FAILURES=prune):\n"
                + "\n".join(f"  {n}" for n in now_passing))
        if unknown:
            problems.append(
                f"{len(unknown)} line(s) in {KNOWN_FAILURES.name} name no case of the suite: "
                "remove them:\n" + "\n".join(f"  {n}" for n in unknown))
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)

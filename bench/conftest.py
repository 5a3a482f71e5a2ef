"""Shared pieces of the micro-benchmarks (see docs/benchmarks.md).

These are not tests: pyproject's ``testpaths`` keeps them out of a plain
``pytest`` run.  Run them with ``bash bench/run_all.sh`` or
``python -m pytest bench/ --benchmark-only``.

Every benchmark records, in ``benchmark.extra_info``:

* ``role``: ``subject`` (the broker's code), ``baseline`` (the simplest
  pure-Python equivalent, the peer every ratio is taken against) or
  ``floor`` (an even cheaper reference that does less work, shown for scale);
* ``records``/``bytes``/``appends``: work done per timed round, so that
  ``bench/report.py`` can turn times into rates and ratios.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

import broker._session


@pytest.fixture
def bench_dir() -> Iterator[str]:
    """A scratch directory on the real disk (not tmpfs): fsync costs what it costs."""
    with tempfile.TemporaryDirectory(prefix="broker-bench-", dir=tempfile.gettempdir()) as d:
        yield d


@pytest.fixture
def fsync_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the broker's fsync rounds (calls of ``_session.fsync_all``).

    A counting wrapper, installed for the one benchmark that asks for it; the
    package itself is not changed.
    """
    count = [0]
    real = broker._session.fsync_all

    def counting(fds: list[int], directory: str | None) -> None:
        count[0] += 1
        real(fds, directory)

    monkeypatch.setattr(broker._session, "fsync_all", counting)
    return count

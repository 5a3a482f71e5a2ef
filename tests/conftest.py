from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import broker


@pytest.fixture
async def b(tmp_path: Path) -> AsyncIterator[broker.Broker]:
    """A broker on a fresh data directory, with small segments so tests roll them."""
    async with broker.open_broker(tmp_path / "data", segment_bytes=4096,
                                  ring_bytes=2048) as br:
        yield br

"""Helpers shared by the benchmark modules (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio

import broker

PAYLOAD_BYTES = 100


def make_payloads(n: int, size: int = PAYLOAD_BYTES) -> list[bytes]:
    """``n`` distinct payloads of ``size`` random bytes."""
    return [os.urandom(size) for _ in range(n)]


class BrokerThread:
    """A broker open in a Trio loop on a background thread.

    pytest-benchmark times plain callables, so a timed round calls
    ``run(afn, ...)``, which runs ``await afn(broker, ...)`` in the loop and waits
    for it (``trio.from_thread.run``, some tens of microseconds per round).  The
    broker stays open across rounds, so opening, recovery and closing are not
    timed.
    """

    def __init__(self, data_dir: str, **config: Any) -> None:
        self._data_dir = data_dir
        self._config = config
        self._ready: queue.Queue[BaseException | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="bench-broker", daemon=True)
        self.broker: broker.Broker | None = None

    def __enter__(self) -> BrokerThread:
        self._thread.start()
        err = self._ready.get()
        if err is not None:
            raise err
        return self

    def __exit__(self, *exc: object) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def amain() -> None:
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            async with broker.open_broker(self._data_dir, **self._config) as b:
                self.broker = b
                self._ready.put(None)
                await self._stop.wait()

        try:
            trio.run(amain)
        except BaseException as exc:  # report it to the test thread
            self._error = exc
            self._ready.put(exc)

    def run(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(afn, self.broker, *args, trio_token=self._token)

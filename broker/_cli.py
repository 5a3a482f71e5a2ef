"""The ``broker`` command: ``broker serve`` runs the broker as a service.

Options come from, in rising precedence: built-in defaults, environment
variables (``BROKER_HOST``, ``BROKER_PORT``, ``BROKER_DATA_DIR``,
``BROKER_FSYNC``), then command-line flags.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from ._broker import open_broker
from ._config import BrokerConfig, FsyncPolicy
from ._server import HttpServer
from ._streams import StreamsApi

log = logging.getLogger("broker")


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="broker", description="A durable session broker.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the broker in the foreground")
    s.add_argument("--host", default=env("BROKER_HOST", "127.0.0.1"))
    s.add_argument("--port", type=int, default=int(env("BROKER_PORT", "4437")),
                   help="0 picks a free port (the 'listening on' line shows it)")
    s.add_argument("--data-dir", default=env("BROKER_DATA_DIR", "./broker-data"))
    s.add_argument("--fsync", type=FsyncPolicy.parse,
                   default=FsyncPolicy.parse(env("BROKER_FSYNC", "group")),
                   help="always | group[:Nms[:N]] | never (default group:2ms:1000)")
    s.add_argument("--long-poll-timeout-ms", type=int,
                   default=int(env("BROKER_LONG_POLL_TIMEOUT_MS", "30000")),
                   help="how long a long-poll (and an idle SSE stream) waits at the tail")
    s.add_argument("--sse-max-s", type=float, default=float(env("BROKER_SSE_MAX_S", "60")),
                   help="an SSE response ends after this long, so the client reconnects")
    s.add_argument("--log-level", default=env("BROKER_LOG_LEVEL", "INFO"))
    return p


async def serve(host: str, port: int, data_dir: str, config: BrokerConfig,
                long_poll_timeout_s: float = 30.0, sse_max_s: float = 60.0,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Run until SIGINT or SIGTERM; then stop listening, sync, and return."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_broker(data_dir, config) as broker:
            server = HttpServer(broker, StreamsApi(broker, long_poll_timeout_s, sse_max_s))
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    functools.partial(trio.serve_tcp, server.serve_connection, port, host=host))
                bound = listeners[0].socket.getsockname()[1]
                print(f"listening on http://{host}:{bound}", file=sys.stderr, flush=True)
                task_status.started(bound)
                async for sig in signals:
                    log.info("received %s: shutting down", signal.Signals(sig).name)
                    break
                nursery.cancel_scope.cancel()
    log.info("stopped; every session synced")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        trio.run(serve, args.host, args.port, args.data_dir, BrokerConfig(fsync=args.fsync),
                 args.long_poll_timeout_ms / 1000, args.sse_max_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

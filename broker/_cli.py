"""The ``broker`` command: ``broker serve`` runs the broker as a service.

Options come from, in rising precedence: built-in defaults, a TOML config file
(``--config`` or ``BROKER_CONFIG``), environment variables (``BROKER_PORT``,
...), then command-line flags.  README.md ("Configuration") lists them all.

Shutdown: on SIGINT or SIGTERM the listener closes (no new connections), live
waits (long-polls, SSE) are ended and WebSockets closed (1001) so their
clients reconnect elsewhere,
in-flight requests get up to ``--shutdown-grace-s`` to finish, and then every
session is synced and the process exits 0.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ._broker import open_broker
from ._config import BrokerConfig, FsyncPolicy
from ._server import HttpServer
from ._streams import StreamsApi
from ._ws import WsConfig, WsServer

log = logging.getLogger("broker")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 4437
    data_dir: str = "./broker-data"
    fsync: str = "group"
    long_poll_timeout_ms: int = 30_000
    sse_max_s: float = 60.0
    shutdown_grace_s: float = 10.0
    segment_bytes: int = 64 * 1024 * 1024
    retention_bytes: int = 0
    ws_heartbeat_s: float = 25.0
    ws_max_message: int = 1 << 20
    log_level: str = "INFO"


# option -> (type, help)
_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "host": (str, "address to listen on"),
    "port": (int, "TCP port; 0 picks a free one (the 'listening on' line shows it)"),
    "data_dir": (str, "where sessions are stored"),
    "fsync": (str, "always | group[:Nms[:N]] | never (default group:2ms:1000)"),
    "long_poll_timeout_ms": (int, "how long a long-poll (and an idle SSE stream) waits"),
    "sse_max_s": (float, "an SSE response ends after this long, so the client reconnects"),
    "shutdown_grace_s": (float, "how long in-flight requests may finish on shutdown"),
    "segment_bytes": (int, "a segment file rolls before it would pass this size"),
    "retention_bytes": (int, "per session, older whole segments are deleted past this "
                             "size; 0 keeps everything"),
    "ws_heartbeat_s": (float, "seconds between WebSocket pings; a peer that misses a pong "
                              "by the next one is dropped"),
    "ws_max_message": (int, "largest WebSocket message accepted, in bytes"),
    "log_level": (str, "DEBUG, INFO, WARNING or ERROR"),
}


def resolve_options(flags: dict[str, Any], environ: dict[str, str]) -> ServeOptions:
    """Defaults < config file < BROKER_* environment < flags."""
    values: dict[str, Any] = {}
    path = flags.get("config") or environ.get("BROKER_CONFIG")
    if path:
        with open(path, "rb") as f:
            table = tomllib.load(f)
        for key, value in table.items():
            key = key.replace("-", "_")
            if key not in _OPTIONS:
                raise SystemExit(f"{path}: unknown option {key!r}")
            values[key] = _OPTIONS[key][0](str(value)) if not isinstance(value, bool) else value
    for key, (kind, _) in _OPTIONS.items():
        env = environ.get("BROKER_" + key.upper())
        if env is not None:
            values[key] = kind(env)
        if flags.get(key) is not None:
            values[key] = flags[key]
    opts = ServeOptions(**values)
    FsyncPolicy.parse(opts.fsync)          # fail early on a bad policy
    return opts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="broker", description="A durable session broker.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the broker in the foreground")
    s.add_argument("--config", help="a TOML file of options (keys as below, e.g. port = 8080)")
    for key, (kind, text) in _OPTIONS.items():
        default = getattr(ServeOptions(), key)
        s.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                       help=f"{text} [default {default}; env BROKER_{key.upper()}]")
    return p


async def serve(opts: ServeOptions,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Run until SIGINT or SIGTERM; then drain, sync, and return."""
    config = BrokerConfig(fsync=FsyncPolicy.parse(opts.fsync), segment_bytes=opts.segment_bytes,
                          retention_bytes=opts.retention_bytes or None)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_broker(opts.data_dir, config) as broker:
            streams = StreamsApi(broker, opts.long_poll_timeout_ms / 1000, opts.sse_max_s)
            ws = WsServer(broker, WsConfig(heartbeat_s=opts.ws_heartbeat_s,
                                           max_message=opts.ws_max_message))
            server = HttpServer(broker, streams, ws)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as listening:
                    listeners = await listening.start(functools.partial(
                        trio.serve_tcp, server.serve_connection, opts.port, host=opts.host,
                        handler_nursery=connections))
                    bound = listeners[0].socket.getsockname()[1]
                    print(f"listening on http://{opts.host}:{bound}", file=sys.stderr,
                          flush=True)
                    task_status.started(bound)
                    async for sig in signals:
                        log.info("received %s: shutting down", signal.Signals(sig).name)
                        break
                    listening.cancel_scope.cancel()     # stop accepting
                server.closing = True                   # keep-alive connections close
                streams.shut_down()                     # end long-polls and SSE now
                ws.shut_down()                          # WebSockets close with 1001
                with trio.move_on_after(opts.shutdown_grace_s) as grace:
                    while connections.child_tasks:
                        await trio.sleep(0.05)
                if grace.cancelled_caught:
                    log.warning("%d connections still busy after %.1f s: closing them",
                                len(connections.child_tasks), opts.shutdown_grace_s)
                connections.cancel_scope.cancel()
    log.info("stopped; every session synced")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        opts = resolve_options(vars(args), dict(os.environ))
        logging.basicConfig(level=opts.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        trio.run(serve, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())

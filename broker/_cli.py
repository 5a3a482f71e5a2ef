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
import ipaddress
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ._auth import Authenticator, mint, parse_cap_option
from ._broker import open_broker
from ._config import BrokerConfig, FsyncPolicy
from ._demo import DemoAgent
from ._limits import HttpLimits
from ._server import HttpServer, make_ssl_context
from ._streams import StreamsApi
from ._ws import WsConfig, WsServer

log = logging.getLogger("broker")


# The components' own defaults, so that each is written in one place.
_BROKER, _WS, _HTTP = BrokerConfig(), WsConfig(), HttpLimits()


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 4437
    data_dir: str = "./broker-data"
    fsync: str = "group"
    deliver: str = _BROKER.deliver
    long_poll_timeout_ms: int = 30_000
    sse_max_s: float = 60.0
    shutdown_grace_s: float = 10.0
    segment_bytes: int = _BROKER.segment_bytes
    retention_bytes: int = 0
    ws_heartbeat_s: float = _WS.heartbeat_s
    ws_max_message: int = _WS.max_message
    ws_max_sessions: int = _WS.max_sessions
    ws_hello_timeout_s: float = _WS.hello_timeout_s
    ws_publish_rate: float = _WS.publish_rate
    ws_publish_burst: int = _WS.publish_burst
    max_record_bytes: int = _BROKER.max_record_bytes
    max_batch_records: int = _WS.max_publish_records
    max_body_bytes: int = _HTTP.max_body_bytes
    max_connections: int = _HTTP.max_connections
    header_timeout_s: float = _HTTP.header_timeout_s
    keepalive_timeout_s: float = _HTTP.keepalive_timeout_s
    http_publish_rate: float = _HTTP.publish_rate
    http_publish_burst: int = _HTTP.publish_burst
    auth_secret: str | None = None
    auth_public_key: str | None = None
    insecure_no_auth: bool = False
    demo: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "INFO"


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        raise ValueError(f"not a yes/no value: {text!r}")
    return value in ("1", "true", "yes", "on")


_SECRET_OPTIONS = ("auth_secret",)      # never shown by --help defaults or logs

# option -> (type, help)
_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "host": (str, "address to listen on"),
    "port": (int, "TCP port; 0 picks a free one (the 'listening on' line shows it)"),
    "data_dir": (str, "where sessions are stored"),
    "fsync": (str, "always | group[:Nms[:N]] | never (default group:2ms:1000)"),
    "deliver": (str, "when readers see a record: written (once written to the OS; its "
                     "append is still acked once durable) or durable"),
    "long_poll_timeout_ms": (int, "how long a long-poll (and an idle SSE stream) waits"),
    "sse_max_s": (float, "an SSE response ends after this long, so the client reconnects"),
    "shutdown_grace_s": (float, "how long in-flight requests may finish on shutdown"),
    "segment_bytes": (int, "a segment file rolls before it would pass this size"),
    "retention_bytes": (int, "per session, older whole segments are deleted past this "
                             "size; 0 keeps everything"),
    "ws_heartbeat_s": (float, "seconds between WebSocket pings; a peer that misses a pong "
                              "by the next one is dropped"),
    "ws_max_message": (int, "largest WebSocket message accepted, in bytes"),
    "ws_max_sessions": (int, "sessions one WebSocket connection may attach at once"),
    "ws_hello_timeout_s": (float, "a WebSocket that has not sent an accepted hello by then "
                                  "is closed"),
    "ws_publish_rate": (float, "records per second one WebSocket connection may publish; "
                               "0 is unlimited"),
    "ws_publish_burst": (int, "records a WebSocket publisher may send at once above the rate; "
                              "0 means one second's worth"),
    "max_record_bytes": (int, "largest record payload accepted, in bytes"),
    "max_batch_records": (int, "records in one publish (a WebSocket batch or a JSON array POST)"),
    "max_body_bytes": (int, "largest HTTP request body; beyond it 413"),
    "max_connections": (int, "open connections at once; beyond it 503 and close"),
    "header_timeout_s": (float, "a request head, TLS handshake or WebSocket upgrade must "
                                "arrive within this"),
    "keepalive_timeout_s": (float, "an idle HTTP keep-alive connection is closed after this"),
    "http_publish_rate": (float, "appends (POSTs) per second one HTTP connection may make; "
                                 "beyond it 429; 0 is unlimited"),
    "http_publish_burst": (int, "POSTs an HTTP connection may make at once above the rate; "
                                "0 means one second's worth"),
    "auth_secret": (str, "HS256 secret (at least 32 bytes): turns on token auth"),
    "auth_public_key": (str, "PEM public key file (Ed25519, RSA or EC P-256): turns on token "
                             "auth with EdDSA, RS256 or ES256"),
    "insecure_no_auth": (_flag, "allow a non-loopback address without token auth"),
    "demo": (_flag, "serve the demo page at /demo and run a simulated agent on the "
                    "demo/* sessions"),
    "tls_cert": (str, "PEM certificate chain: serve HTTPS and WSS"),
    "tls_key": (str, "PEM private key for --tls-cert"),
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
            values[key] = value if isinstance(value, bool) else _OPTIONS[key][0](str(value))
    for key, (kind, _) in _OPTIONS.items():
        env = environ.get("BROKER_" + key.upper())
        if env is not None:
            values[key] = kind(env)
        if flags.get(key) is not None:
            values[key] = flags[key]
    opts = ServeOptions(**values)
    FsyncPolicy.parse(opts.fsync)          # fail early on a bad policy
    # Fail early on a bad delivery mode, by the config's own check.
    BrokerConfig(deliver=opts.deliver)  # type: ignore[arg-type]
    if bool(opts.tls_cert) != bool(opts.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    if not (opts.auth_secret or opts.auth_public_key) and not opts.insecure_no_auth \
            and not is_loopback(opts.host):
        raise SystemExit(f"refusing to listen on {opts.host} without token auth: give "
                         "--auth-secret or --auth-public-key, or --insecure-no-auth to run open")
    return opts


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="broker", description="A durable session broker.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the broker in the foreground")
    s.add_argument("--config", help="a TOML file of options (keys as below, e.g. port = 8080)")
    for key, (kind, text) in _OPTIONS.items():
        default = getattr(ServeOptions(), key)
        flag = "--" + key.replace("_", "-")
        hint = f"env BROKER_{key.upper()}" if key in _SECRET_OPTIONS \
            else f"default {default}; env BROKER_{key.upper()}"
        if kind is _flag:
            s.add_argument(flag, action="store_true", default=None, help=f"{text} [{hint}]")
        else:
            s.add_argument(flag, type=kind, default=None, help=f"{text} [{hint}]")
    t = sub.add_parser("token", help="mint a token for development")
    t.add_argument("--sub", required=True, help="the client id (stamped on what it publishes)")
    t.add_argument("--cap", action="append", default=[], metavar="GLOB=OPS",
                   help="a capability, e.g. 'chat/*=read,append'; repeat for more")
    t.add_argument("--ttl", type=float, default=3600.0, help="seconds until expiry [3600]")
    t.add_argument("--secret", help="HS256 secret [env BROKER_AUTH_SECRET]")
    t.add_argument("--private-key", help="PEM private key file (Ed25519, RSA or EC P-256) "
                                         "instead of a secret")
    return p


def mint_token(args: argparse.Namespace, environ: dict[str, str]) -> str:
    caps: dict[str, list[str]] = {}
    try:
        for text in args.cap:
            glob, ops = parse_cap_option(text)
            caps.setdefault(glob, []).extend(ops)
        if args.private_key:
            with open(args.private_key, "rb") as f:
                return mint(args.sub, caps, ttl_s=args.ttl, private_key_pem=f.read())
        secret = args.secret or environ.get("BROKER_AUTH_SECRET")
        if not secret:
            raise SystemExit("broker token needs --secret, BROKER_AUTH_SECRET or --private-key")
        Authenticator(secret)           # the same length rule as the server's
        return mint(args.sub, caps, ttl_s=args.ttl, secret=secret)
    except ValueError as exc:
        raise SystemExit(f"broker token: {exc}") from None


async def serve(opts: ServeOptions,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Run until SIGINT or SIGTERM; then drain, sync, and return."""
    config = BrokerConfig(fsync=FsyncPolicy.parse(opts.fsync), segment_bytes=opts.segment_bytes,
                          retention_bytes=opts.retention_bytes or None,
                          max_record_bytes=opts.max_record_bytes,
                          deliver=opts.deliver)  # type: ignore[arg-type]
    try:
        auth = Authenticator.from_options(opts.auth_secret, opts.auth_public_key)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"auth: {exc}") from None
    if not auth.enabled:
        log.warning("token auth is off: anyone who can reach %s:%d may read and write every "
                    "session (give --auth-secret to turn it on)", opts.host, opts.port)
    ssl_context = make_ssl_context(opts.tls_cert, opts.tls_key) \
        if opts.tls_cert and opts.tls_key else None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_broker(opts.data_dir, config) as broker:
            streams = StreamsApi(broker, opts.long_poll_timeout_ms / 1000, opts.sse_max_s,
                                 auth=auth, max_batch_records=opts.max_batch_records)
            ws = WsServer(broker, WsConfig(
                heartbeat_s=opts.ws_heartbeat_s, max_message=opts.ws_max_message,
                max_publish_records=opts.max_batch_records, max_sessions=opts.ws_max_sessions,
                hello_timeout_s=opts.ws_hello_timeout_s, publish_rate=opts.ws_publish_rate,
                publish_burst=opts.ws_publish_burst), auth=auth)
            limits = HttpLimits(
                max_connections=opts.max_connections, max_body_bytes=opts.max_body_bytes,
                header_timeout_s=opts.header_timeout_s,
                keepalive_timeout_s=opts.keepalive_timeout_s,
                publish_rate=opts.http_publish_rate, publish_burst=opts.http_publish_burst)
            server = HttpServer(broker, streams, ws, limits=limits, ssl_context=ssl_context,
                                # Open on loopback: only this machine's pages, unless
                                # --insecure-no-auth says a local proxy decides.
                                local_only=not auth.enabled and is_loopback(opts.host)
                                and not opts.insecure_no_auth,
                                demo=opts.demo)
            async with trio.open_nursery() as background, trio.open_nursery() as connections:
                if opts.demo:
                    background.start_soon(DemoAgent(broker).run)
                async with trio.open_nursery() as listening:
                    listeners = await listening.start(functools.partial(
                        trio.serve_tcp, server.serve_connection, opts.port, host=opts.host,
                        handler_nursery=connections))
                    bound = listeners[0].socket.getsockname()[1]
                    scheme = "https" if ssl_context else "http"
                    print(f"listening on {scheme}://{opts.host}:{bound}", file=sys.stderr,
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
                background.cancel_scope.cancel()        # before the broker closes
    log.info("stopped; every session synced")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "token":
        print(mint_token(args, dict(os.environ)))
        return 0
    if args.command == "serve":
        opts = resolve_options(vars(args), dict(os.environ))
        logging.basicConfig(level=opts.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        trio.run(serve, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())

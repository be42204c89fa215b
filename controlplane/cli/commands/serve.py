"""`controlplane serve`: the HTTP API, the scheduled jobs and the ingest consumers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Iterator

import msgspec

from controlplane.cli.common import Subparsers, core
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="run the HTTP API and the scheduled jobs")
    p.add_argument("--host", help="address to listen on (default: [server] host)")
    p.add_argument("--port", type=int, help="port to listen on (default: [server] port)")
    p.add_argument("--no-migrate", action="store_true", help="do not apply pending migrations")
    p.add_argument("--no-scheduler", action="store_true", help="do not run rollup and send jobs")
    p.set_defaults(func=serve, sync=True, keeps_log_level=True)


def serve(args: argparse.Namespace, config: Config) -> int:
    import uvicorn

    from controlplane.http.app import create_app

    if args.no_migrate:
        config = msgspec.structs.replace(
            config, server=msgspec.structs.replace(config.server, migrate_on_start=False)
        )
    host = args.host or config.server.host
    port = args.port or config.server.port
    plane = core(config, migrate=config.server.migrate_on_start)
    app = create_app(config, cp=plane, started=True, scheduler=not args.no_scheduler)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="on"
        )
    )

    sock = _bind(host, port)  # a port in use is one line and exit 2, before anything starts

    async def run() -> None:
        # Started here, not in the app's lifespan: a control plane that cannot start (storage
        # unreachable, a bad plugin setting) is one line on stderr, as for every command.
        async with plane:
            await plane.start_ingest()  # the [[ingest]] consumers, closed before storage
            with _sigterm_after_uvicorn_ignored():
                serving = asyncio.create_task(server.serve(sockets=[sock]))
                while not (server.started or serving.done()):  # noqa: ASYNC110 - no event
                    await asyncio.sleep(0.02)
                if server.started:
                    print(
                        f"control plane listening on http://{host}:{port} (config {config.source})",
                        file=sys.stderr,
                    )
                await serving

    asyncio.run(run())
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound as uvicorn binds it; OSError (a port in use) otherwise."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


@contextlib.contextmanager
def _sigterm_after_uvicorn_ignored() -> Iterator[None]:
    """uvicorn stops on SIGTERM, then raises it again once its own handler is gone: with the
    default handler that would end the process before the control plane closes. Signals
    reach the main thread only; elsewhere there is nothing to do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

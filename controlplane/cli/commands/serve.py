"""`controlplane serve`: the HTTP API, the scheduled jobs and the ingest consumers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import msgspec

from controlplane.cli.common import Subparsers, core
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="run the HTTP API and the scheduled jobs")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--no-migrate", action="store_true", help="do not apply pending migrations")
    p.add_argument("--no-scheduler", action="store_true", help="do not run rollup and send jobs")
    p.set_defaults(func=serve, sync=True)


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

    async def run() -> None:
        # Started here, not in the app's lifespan: a control plane that cannot start (storage
        # unreachable, a bad plugin setting) is one line on stderr, as for every command.
        async with plane:
            await plane.start_ingest()  # the [[ingest]] consumers, closed before storage
            print(
                f"control plane listening on http://{host}:{port} (config {config.source})",
                file=sys.stderr,
            )
            with _sigterm_after_uvicorn_ignored():
                await server.serve()

    asyncio.run(run())
    return 0


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

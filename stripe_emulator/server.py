"""Serving the ASGI app over HTTP/1.1 with uvicorn, on the caller's event loop or a thread's.

uvicorn does the HTTP (its ``httptools`` protocol when that is installed, else ``h11``): keep-alive,
pipelining, chunked bodies, ``Expect: 100-continue``. :class:`EmulatorServer` only starts
uvicorn's listener on a socket bound here, on the running loop and without uvicorn's signal
handling (the caller owns the process), and stops it quickly: idle keep-alive connections close
at once, replies in flight get up to two seconds. Responses carry exactly the app's headers (no
``server`` or ``date``), as before the move to uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn

from stripe_emulator.app import DROPPING, ASGIApp, StripeEmulator

DEFAULT_PORT = 12111  # the port stripe-mock uses, so tools pointed at it find this one
KEEP_ALIVE_SECONDS = 3600  # an idle client connection stays open (uvicorn's default is 5 s)
MAX_HEAD_BYTES = 64 * 1024
STOP_WAIT_SECONDS = 2.0

_INCOMPLETE = "ASGI callable returned without completing response."


class _QuietDrops(logging.Filter):
    """uvicorn logs an error when an app returns in the middle of a response; the emulator's
    drop fault does that on purpose (see ``DROPPING``), so that one is not logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (DROPPING.get() and record.getMessage() == _INCOMPLETE)


_quiet_drops = _QuietDrops()


class EmulatorServer:
    """Serves an ASGI app over HTTP/1.1 (uvicorn) on a bound socket, on the running loop."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.address: tuple[str, int] | None = None
        self._server: uvicorn.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        sockname = sock.getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        logger = logging.getLogger("uvicorn.error")
        if _quiet_drops not in logger.filters:
            logger.addFilter(_quiet_drops)
        config = uvicorn.Config(
            self.app,
            interface="asgi3",
            lifespan="off",  # serve_emulator attaches the emulator to the loop itself
            ws="none",
            proxy_headers=False,
            server_header=False,
            date_header=False,
            access_log=False,
            log_config=None,  # leave the process's logging as it is
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            backlog=1024,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._server = server

    async def stop(self) -> None:
        """Stop listening, close idle connections, give replies in flight a moment to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        for listener in server.servers:
            listener.close()
        for connection in list(server.server_state.connections):
            connection.shutdown()  # closes an idle one now, a busy one after its reply
        for _ in range(int(STOP_WAIT_SECONDS / 0.01)):
            if not server.server_state.connections:
                break
            await asyncio.sleep(0.01)
        for listener in server.servers:
            await listener.wait_closed()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets that say so,
    # and without it Nagle's algorithm stalls replies for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@asynccontextmanager
async def serve_emulator(
    emulator: StripeEmulator | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve `emulator` on the running event loop (port 0: a free one); yields the base URL."""
    emulator = emulator or StripeEmulator()
    sock = _bind(host, port)
    server = EmulatorServer(emulator.app)
    try:
        await server.start(sock)
        emulator.base_url = _url(host, sock)
        await emulator._attach()
        yield emulator.base_url
    finally:
        await emulator._detach()
        await server.stop()
        sock.close()
        emulator.base_url = None


@contextmanager
def serve_emulator_in_thread(
    emulator: StripeEmulator | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Serve `emulator` from a background thread with its own event loop; yields the base URL.

    For synchronous tests, or to keep the emulator off the caller's event loop. Its state is
    then touched from that thread: read it through the HTTP hooks, or while no call is in flight.
    """
    emulator = emulator or StripeEmulator()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        async with serve_emulator(emulator, host=host, port=port):
            ready.set()
            await stop.wait()

    def main() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)
        finally:
            ready.set()
            loop.close()

    thread = threading.Thread(target=main, name="stripe-emulator", daemon=True)
    thread.start()
    ready.wait()
    try:
        if failure or emulator.base_url is None:
            raise RuntimeError("the Stripe emulator failed to start") from (
                failure[0] if failure else None
            )
        yield emulator.base_url
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout=10)

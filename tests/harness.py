"""Services that tests start on loopback: real PostgreSQL and Redis servers, a small HTTP server.

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` from the machine's PostgreSQL (on PATH or
under ``/usr/lib/postgresql/*/bin``; ``./run test`` installs Debian's package when neither has
it) in a temporary folder, listening on 127.0.0.1 on a free port with its unix socket in that
folder. PostgreSQL refuses to run as root, so as root the server runs as the unprivileged
``postgres`` user (created when missing).

:class:`HTTPRecorder` is an in-process HTTP server on a loopback port that records every
request and answers from a settable routing function: a webhook receiver, or a fake legacy API.

:class:`RedisServer` runs the machine's ``redis-server`` (``./run test`` installs Debian's
package when it is missing) on 127.0.0.1 and a free port, without persistence.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import free_port

PG_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found or started."""


def find_pg_bin() -> Path | None:
    """The folder holding `initdb` and `pg_ctl`, newest PostgreSQL first."""
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates.extend(Path(p) for p in reversed(versions))
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


class PostgresServer:
    """A throwaway PostgreSQL cluster; `start()` returns a DSN for database `database`."""

    def __init__(self, database: str = "legacy") -> None:
        self.database = database
        self.port = free_port()
        self.root: Path | None = None
        self.bin: Path | None = None
        self._as: list[str] = []

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        assert self.bin is not None
        cmd = [*self._as, str(self.bin / args[0]), *args[1:]]
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            check=False,
        )
        if done.returncode != 0:
            log = self._log()
            raise PostgresUnavailable(
                f"{' '.join(args[:1])} failed ({done.returncode}): {done.stderr.strip()}"
                + (f"\nserver log:\n{log}" if log else "")
            )

    def _log(self) -> str:
        if self.root and (self.root / "server.log").exists():
            return (self.root / "server.log").read_text(errors="replace")[-3000:]
        return ""

    def start(self) -> str:
        self.bin = find_pg_bin()
        if self.bin is None:
            raise PostgresUnavailable(
                "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin);"
                " `./run test` installs it, or: apt-get install postgresql"
            )
        self.root = Path(tempfile.mkdtemp(prefix="cp-pg-"))
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            user = _ensure_user(PG_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", PG_USER, "--"]
        data = self.root / "data"
        self._run(
            "initdb", "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -F -c max_connections=40"
        self._run(
            "pg_ctl", "-D", str(data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
            "-o", options, "start",
        )  # fmt: skip
        try:
            asyncio.run(self._create_database())
        except Exception as exc:
            self.stop()
            raise PostgresUnavailable(f"cannot create database {self.database}: {exc}") from exc
        return self.dsn

    async def _create_database(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(
            f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres", timeout=30
        )
        try:
            await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()

    def stop(self) -> None:
        if self.root is None:
            return
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(PostgresUnavailable, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


def fresh_database(server_dsn: str) -> str:
    """A new empty database on the server of `server_dsn`; its DSN."""
    import uuid

    import asyncpg

    name = f"cp_{uuid.uuid4().hex[:12]}"
    base, _, _ = server_dsn.rpartition("/")

    async def create() -> None:
        conn = await asyncpg.connect(f"{base}/postgres", timeout=30)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create()) if not _loop_running() else _in_thread(create)
    return f"{base}/{name}"


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _in_thread(make: Callable[[], Any]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(make())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


# HTTP -------------------------------------------------------------------------------------


class Request:
    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


Route = Callable[[Request], tuple[int, Any]]


class HTTPRecorder:
    """An HTTP server on 127.0.0.1 that records requests and answers with `route(request)`:
    (status, JSON-able body). Use as a context manager."""

    def __init__(self, route: Route | None = None) -> None:
        self.route: Route = route or (lambda _request: (200, {"ok": True}))
        self.requests: list[Request] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                request = Request(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length) if length else b"",
                )
                recorder.requests.append(request)
                status, body = recorder.route(request)
                payload = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> HTTPRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# Redis ------------------------------------------------------------------------------------


class RedisUnavailable(RuntimeError):
    """Redis could not be found or started."""


def find_redis_server() -> str | None:
    """`redis-server` on PATH, or where Debian's package puts it."""
    found = shutil.which("redis-server")
    if found:
        return found
    for folder in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        candidate = f"{folder}/redis-server"
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class RedisServer:
    """A throwaway `redis-server` on 127.0.0.1 and a free port, in a temporary folder, with no
    persistence (no RDB snapshots, no AOF); `start()` returns its URL."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _log(self) -> str:
        if self.root and (self.root / "redis.log").exists():
            return (self.root / "redis.log").read_text(errors="replace")[-3000:]
        return ""

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 20.0) -> str:
        binary = find_redis_server()
        if binary is None:
            raise RedisUnavailable(
                "redis-server is not installed; `./run test` installs it, "
                "or: apt-get install redis-server"
            )
        self.root = Path(tempfile.mkdtemp(prefix="cp-redis-"))
        args = [
            binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.root),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
            "--logfile", str(self.root / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self._log()
                self.stop()
                raise RedisUnavailable(f"redis-server exited ({self.proc.returncode}):\n{log}")
            if self._pong():
                return self.url
            time.sleep(0.05)
        log = self._log()
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer within {timeout} s:\n{log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

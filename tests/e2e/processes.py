"""Real processes for end-to-end tests: `controlplane serve` and friends on loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import TOKEN, free_port, token_hash

ROOT = Path(__file__).resolve().parents[2]


def base_config(
    db: Path | str,
    *,
    scopes: str = "ingest read admin",
    synchronous: str = "normal",
) -> str:
    """What every end-to-end config shares: storage (SQLite at the path `db`, or PostgreSQL
    when `db` is a postgresql:// DSN), the test token with `scopes`, quiet logs and the `gbs`
    meter (`memory_gb_seconds` at the provider). Tests append their own sections."""
    scope_list = ", ".join(f'"{s}"' for s in scopes.split())
    if str(db).startswith("postgresql://"):
        storage = f'backend = "postgres"\ndsn = "{db}"'
    else:
        storage = f'backend = "sqlite"\npath = "{db}"\nsynchronous = "{synchronous}"'
    return f"""
[storage]
{storage}

[[auth.tokens]]
name = "e2e"
sha256 = "{token_hash(TOKEN)}"
scopes = [{scope_list}]

[logging]
level = "warning"

[[meters]]
name = "gbs"
event_type = "tick"
value = "data.mb * data.s / 1024"
event_name = "memory_gb_seconds"
"""


class Process:
    """A child process whose output goes to a log file (shown when a test fails)."""

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.args = args
        self.cwd = cwd
        self.log_path = log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flush, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if hasattr(self, "_log"):
            self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


class Server(Process):
    """`controlplane serve` on a free loopback port."""

    def __init__(
        self, config: Path, log: Path, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                sys.executable,
                "-m",
                "controlplane",
                "serve",
                "--config",
                str(config),
                "--port",
                str(self.port),
                *extra,
            ],
            log,
            env,
        )

    def start(self, timeout: float = 20.0) -> None:
        super().start()
        wait_http(f"{self.url}/healthz", timeout, self)


def wait_http(url: str, timeout: float, proc: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc and proc.proc and proc.proc.poll() is not None:
            raise RuntimeError(f"process exited early:\n{proc.output()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not up after {timeout}s" + (f":\n{proc.output()}" if proc else ""))


def bearer(token: str) -> dict[str, Any]:
    return {"Authorization": f"Bearer {token}"}


class Emulator(Process):
    """`controlplane stripe-emulator` on a free loopback port."""

    def __init__(self, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                sys.executable,
                "-m",
                "controlplane",
                "stripe-emulator",
                "--port",
                str(self.port),
                "--quiet",
                *extra,
            ],
            log,
        )

    def start(self, timeout: float = 20.0) -> None:
        super().start()
        wait_http(f"{self.url}/_emulator/state", timeout, self)

    def state(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_emulator/state", timeout=5).json()  # type: ignore[no-any-return]

    def faults(self, **faults: Any) -> None:
        httpx.post(f"{self.url}/_emulator/faults", json=faults, timeout=5).raise_for_status()

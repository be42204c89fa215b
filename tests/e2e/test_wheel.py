"""The installed product, as a user gets it: the wheel built from this tree, installed into a
fresh virtual environment with no source tree on the path, migrates and serves on SQLite and
on PostgreSQL (SQL and migrations ship as package data; no top-level name but the project's)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TOKEN
from tests.e2e.processes import ROOT, Process, base_config, bearer, free_port, wait_http
from tests.harness import fresh_database

pytestmark = pytest.mark.e2e

OWN_NAMES = {"controlplane", "stripe_emulator"}


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), "."], ROOT)
    (built,) = dist.glob("controlplane-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment holding the wheel and its PostgreSQL extra; its bin/."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(venv)], venv)
    _run([str(venv / "bin" / "pip"), "install", "--quiet", f"{wheel}[postgres]"], venv)
    yield venv / "bin"


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}


def test_the_wheel_holds_only_the_projects_names_and_its_sql(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops <= OWN_NAMES and "controlplane" in tops
    assert "controlplane/plugins/storage/sqlite.sql" in names
    assert "controlplane/plugins/storage/postgres.sql" in names
    assert "controlplane/migrations/sqlite/0001_initial.sql" in names
    assert "controlplane/migrations/postgres/0001_initial.sql" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_installed_wheel_migrates_and_serves(
    installed: Path, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    env = _clean_env()
    where = _run(
        [str(installed / "python"), "-c", "import controlplane; print(controlplane.__file__)"],
        tmp_path,
        env,
    )
    assert where.startswith(str(installed.parent)), where  # not the source tree
    if backend == "sqlite":
        db: str = str(tmp_path / "cp.db")
    else:
        db = fresh_database(request.getfixturevalue("postgres_dsn"))
    config = tmp_path / "controlplane.toml"
    config.write_text(base_config(db))
    cli = str(installed / "controlplane")

    out = _run([cli, "migrate", "--config", str(config)], tmp_path, env)
    assert "0001_initial" in out

    port = free_port()
    args = [cli, "serve", "--config", str(config), "--port", str(port)]
    server = Process(args, tmp_path / "serve.log", env, cwd=tmp_path)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", 30, server)
        now_ms = int(time.time() * 1000)
        data = {"mb": 1024, "s": 60}
        event = {"id": "e1", "type": "tick", "subject": "acme", "ts": now_ms, "data": data}
        r = httpx.post(f"{url}/v1/events", json=event, headers=bearer(TOKEN), timeout=10)
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
    finally:
        server.stop()

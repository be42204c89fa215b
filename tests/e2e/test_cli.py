"""The `controlplane` command as people run it, in a subprocess: which config and database it
uses, read-only commands that create nothing, human output and `--json`, quiet logs, one-line
errors with exit 2, and `serve` saying "listening" only once it is."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane import __version__
from controlplane.times import iso
from tests.e2e.processes import ROOT

pytestmark = pytest.mark.e2e

T = int(time.time()) // 86_400 * 86_400 - 86_400  # yesterday, 00:00 UTC: inside Stripe's window


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with a config whose database is a relative path, as in the example."""
    (tmp_path / "cp.toml").write_text('[storage]\nbackend = "sqlite"\npath = "data/cp.db"\n')
    return tmp_path


def test_version() -> None:
    done = cli("--version", cwd=ROOT)
    assert (done.returncode, done.stdout.strip()) == (0, f"controlplane {__version__}")


READ_ONLY = [
    ["flags", "list"],
    ["flags", "audit"],
    ["cutover", "status"],
    ["cutover", "plan", "--at", str(T)],
    ["orgs", "show", "o1"],
    ["catalog", "show"],
    ["audit", "verify"],
    ["parity", "check", "--from", str(T), "--to", str(T + 3600)],
    ["parity", "runs"],
    ["reconcile", "--runs"],
    ["reconcile", "repair"],  # a preview
]


@pytest.mark.parametrize("command", READ_ONLY, ids=lambda c: " ".join(c[:2]))
def test_read_only_commands_never_create_a_database(folder: Path, command: list[str]) -> None:
    """`flags list` run from another folder created and migrated an empty database there and
    showed default flags: a wrong answer shown as a right one."""
    done = cli(*command, "--config", str(folder / "cp.toml"), cwd=folder.parent)
    db = folder / "data" / "cp.db"
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [f"error: no database at {db}"]
    assert not db.exists() and not (folder / "data").exists()


def test_without_config_a_command_names_the_file_and_database_it_uses(folder: Path) -> None:
    env = {"CONTROLPLANE_CONFIG": str(folder / "cp.toml")}
    assert cli("migrate", cwd=Path("/"), env=env).returncode == 0
    done = cli("flags", "list", cwd=Path("/"), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"config {folder / 'cp.toml'}; database {folder / 'data' / 'cp.db'}"
    ]
    named = cli("flags", "list", "--config", str(folder / "cp.toml"), cwd=Path("/"))
    assert named.stderr == ""  # asked for by name: nothing to say


def test_human_output_and_json(folder: Path) -> None:
    config = ["--config", str(folder / "cp.toml")]
    assert cli("migrate", *config, cwd=folder).returncode == 0
    at = iso(T)  # RFC 3339 in
    done = cli("flags", "set", "bill_from", at, "--reason", "plan", *config, cwd=folder)
    assert done.returncode == 0, done.stderr
    assert f"{iso(T)} ({T})" in done.stdout

    listed = cli("flags", "list", *config, cwd=folder).stdout
    rows = {line.split()[0]: line.split()[1:] for line in listed.splitlines()[1:]}
    assert rows["shadow"][:2] == ["yes", "default"]
    assert rows["bill_from"][:3] == [iso(T), f"({T})", "runtime"]
    as_json = json.loads(cli("flags", "list", "--json", *config, cwd=folder).stdout)
    assert as_json["flags"]["bill_from"] == {"value": T, "source": "runtime", "version": 1}

    audit = cli("flags", "audit", *config, cwd=folder).stdout
    assert f"{iso(T)} ({T})" in audit
    for repr_text in ("None", "True", "False", "'"):
        assert repr_text not in audit, audit

    done = cli(
        "orgs", "set", "o1", "--plan", "pro", "--effective-from", at, "--json", *config, cwd=folder
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["plans"] == [{"plan": "pro", "effective_from": T}]
    shown = cli("orgs", "show", "o1", *config, cwd=folder).stdout
    assert f"pro   {iso(T)} ({T})" in shown


def test_commands_log_warnings_only_unless_verbose(folder: Path) -> None:
    """The CLI wrote the config's JSON log lines at info beside its own output."""
    (folder / "cp.toml").write_text(
        (folder / "cp.toml").read_text() + '[logging]\nlevel = "info"\nformat = "json"\n'
    )
    quiet = cli("rollup", "--config", str(folder / "cp.toml"), cwd=folder)  # migrates: logs it
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    (folder / "data" / "cp.db").unlink()
    loud = cli("rollup", "-v", "--config", str(folder / "cp.toml"), cwd=folder)
    assert loud.returncode == 0
    assert any(json.loads(line)["event"] == "storage.migrated" for line in loud.stderr.splitlines())


def test_a_missing_file_is_one_line_and_exit_2(folder: Path) -> None:
    done = cli("ingest", "nothere.ndjson", "--config", str(folder / "cp.toml"), cwd=folder)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: No such file or directory: nothere.ndjson"]
    missing = cli("flags", "list", "--config", "absent.toml", cwd=folder)
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
    assert "absent.toml" in missing.stderr and "Traceback" not in missing.stderr


def test_serve_on_a_port_in_use_is_one_line_and_exit_2(folder: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("serve", "--port", str(port), "--config", str(folder / "cp.toml"), cwd=folder)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert "listening" not in done.stdout

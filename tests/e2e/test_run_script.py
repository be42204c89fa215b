"""`./run serve`, the README's first command: it starts the control plane only beside a
running Stripe emulator, and stops, saying why, when the emulator cannot start."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.e2e.processes import ROOT

pytestmark = pytest.mark.e2e


def test_run_serve_stops_with_the_reason_when_the_emulator_cannot_start() -> None:
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 12111))  # the emulator's port in ./run serve
        except OSError:
            pytest.skip("port 12111 is in use on this machine")
        taken.listen()
        done = subprocess.run(
            ["./run", "serve"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the Stripe emulator did not start on port 12111" in done.stderr
    assert "the control plane was not started" in done.stderr
    assert "listening" not in done.stdout + done.stderr

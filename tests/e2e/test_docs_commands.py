"""The tutorial and the cutover how-to, run as written: every ```sh block, in order, in one
shell, in a fresh folder with the example config, beside a live control plane and the Stripe
emulator (`./run serve` itself is the one block the test stands in for). A command that no
longer works, or a block added without saying what it answers, fails here: the docs cannot
drift from the product again."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.e2e.processes import ROOT, Emulator, Server

pytestmark = pytest.mark.e2e

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(doc: str) -> list[str]:
    """The doc's ```sh blocks; every fenced block says whether it is `sh` or `text`."""
    found = []
    for lang, body in FENCE.findall((ROOT / doc).read_text()):
        assert lang in ("sh", "text"), f"{doc}: a fenced block without `sh` or `text`: {body}"
        if lang == "sh":
            found.append(body)
    return found


def run_doc(doc: str, tmp_path: Path) -> list[tuple[int, str]]:
    """Run the doc's blocks in one bash session; (exit status, output) per block."""
    emulator = Emulator(tmp_path / "emulator.log")
    emulator.start()
    try:
        config = (ROOT / "config.example.toml").read_text()
        config = config.replace("http://127.0.0.1:12111", emulator.url)
        (tmp_path / "controlplane.toml").write_text(config)  # the default, as in a checkout
        (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
        server = Server(tmp_path / "controlplane.toml", tmp_path / "server.log")
        server.start()
        try:
            return _run_blocks(doc, tmp_path, server.port, emulator.port)
        finally:
            server.stop()
    finally:
        emulator.stop()


def _run_blocks(doc: str, folder: Path, port: int, emulator_port: int) -> list[tuple[int, str]]:
    import subprocess

    script = ["set +e", "shopt -s expand_aliases", f"cd {folder}"]
    commands = [b for b in blocks(doc) if b.strip() != "./run serve"]
    for i, body in enumerate(commands):
        body = re.sub(r"(localhost|127\.0\.0\.1):8080", f"127.0.0.1:{port}", body)
        body = body.replace("127.0.0.1:12111", f"127.0.0.1:{emulator_port}")
        (folder / f"block{i}.sh").write_text(body)
        script.append(
            f"source {folder}/block{i}.sh > {folder}/out{i} 2>&1; echo $? > {folder}/rc{i}"
        )
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return [
        (int((folder / f"rc{i}").read_text()), (folder / f"out{i}").read_text())
        for i in range(len(commands))
    ]


def check(results: list[tuple[int, str]], expected: list[tuple[int, list[str]]]) -> None:
    assert len(results) == len(expected), "a block was added or removed: say what it answers"
    for i, ((rc, out), (want_rc, says)) in enumerate(zip(results, expected, strict=True)):
        assert rc == want_rc, f"block {i} exited {rc}:\n{out}"
        for text in says:
            assert text in out, f"block {i} does not say {text!r}:\n{out}"
        assert "Traceback" not in out, out


def test_the_tutorial_runs_as_written(tmp_path: Path) -> None:
    check(
        run_doc("docs/tutorial.md", tmp_path),
        [
            (0, ['"status":"ready"', '"shadow":{"value":true']),  # readyz, flags
            (0, ['{"accepted":1,"duplicates":0}']),
            (0, ['"field":"data.memory_mb"']),
            (0, ['"org_id":"acme"', '"value":"120"']),  # 2048 MB x 60 s / 1024
            (0, ["pending"]),  # the demo's ledger
            (0, ["sent"]),  # demo --cutover
            (0, ['"state":"sent"', "bill_from"]),  # the ledger, the flag audit
            (0, ["shadow", "yes"]),
        ],
    )


def test_the_cutover_howto_runs_as_written(tmp_path: Path) -> None:
    check(
        run_doc("docs/cutover-howto.md", tmp_path),
        [
            (0, ["controlplane "]),  # the virtualenv is active
            (0, ["stage: shadow", "published catalog version 1"]),
            (3, ["no legacy"]),  # parity check and parity money: the example has no [legacy]
            (0, ["cutover at T = ", "change: authority legacy -> controlplane"]),
            (1, ["parity_clean", "FAIL", "NOT ready"]),  # no [legacy] in the example
            (2, ["error: cutover.preflight"]),  # refused: nothing changed
            (0, ["executed: authority controlplane"]),  # the forced rehearsal
            (0, ["stage: live", "legacy_bill_until"]),
            (0, ["rolled back: authority legacy"]),
        ],
    )

"""schemathesis against the OpenAPI document of a live `controlplane serve`.

Every operation gets a bounded number of generated requests (valid and invalid ones, with a
token holding every scope) through schemathesis's examples, coverage and fuzzing phases, and
every check runs: no 5xx, each status code, content type, header and body as the document
says, schema-valid requests not refused as malformed, invalid ones not accepted.

Two allowances, both for rules no OpenAPI document can state:

- a schema-valid request may be answered 422: the app's semantic checks (a meter that cannot
  evaluate an event, a cutover at an unaligned T, an org change with neither customer nor
  plan). 400 stays reserved for requests that break the schema, and is a failure here.
- `/internal/usage-parity` may answer 400 to a schema-valid window (`to` must come after
  `from`), and a Stripe webhook cannot be signed by a fuzzer, so its positive-data check is off.

A failure prints schemathesis's report, with a `curl` line and a seed to replay it
(`CP_FUZZ_SEED=<seed>`). `CP_FUZZ_EXAMPLES` raises the examples per operation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TOKEN
from tests.e2e.processes import Server, base_config

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("CP_FUZZ_EXAMPLES", "10"))
SEED = int(os.environ.get("CP_FUZZ_SEED", "20260101"))
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    config = tmp_path / "cp.toml"
    config.write_text(
        base_config(tmp_path / "cp.db", scopes="ingest read admin parity")
        + '\n[stripe]\nwebhook_secret = "whsec_fuzz"\n\n[parity]\nmeter = "gbs"\n'
    )
    server = Server(config, tmp_path / "server.log", "--no-scheduler")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _settings(path: Path) -> Path:
    quoted = ", ".join(f'"{s}"' for s in ACCEPTED)
    path.write_text(
        f"""
headers = {{ Authorization = "Bearer {TOKEN}" }}
seed = {SEED}
# one worker: threads trip a CPython 3.11 bug in schemathesis ("AST constructor recursion")
workers = 1
color = false

[cache]
enabled = false

[generation]
mode = "all"
max-examples = {EXAMPLES}
database = "none"

[phases.stateful]
enabled = false

[checks]
enabled = true
positive_data_acceptance.expected-statuses = [{quoted}]

[[operations]]
include-path = "/internal/usage-parity"
checks.positive_data_acceptance.expected-statuses = [{quoted}, "400"]

[[operations]]
include-path = "/webhooks/stripe"
checks.positive_data_acceptance.enabled = false
"""
    )
    return path


def test_no_server_errors_and_every_answer_matches_the_schema(
    server: Server, tmp_path: Path
) -> None:
    settings = _settings(tmp_path / "schemathesis.toml")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(settings),
            "run",
            f"{server.url}/schema/openapi.json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = run.stdout[-20000:] + run.stderr[-4000:]
    assert run.returncode == 0, f"schemathesis found problems:\n{report}\n{server.output()}"
    assert "Tested: " in run.stdout, report


HOSTILE_BODIES = [
    b"[" * 1000 + b"]" * 1000,  # nested a thousand levels
    b'{"a":' * 1000 + b"1" + b"}" * 1000,
    b'{"value": ' + b"9" * 400 + b', "reason": "x", "id": ' + b"9" * 5000 + b"}",  # huge ints
    b"[" + b",".join([b"{}"] * 200_000) + b"]",
    b"\xff\xfe not utf-8 \xc3\x28",
]
HOSTILE_HEADERS: list[list[tuple[bytes, bytes]]] = [
    [(b"x-request-id", b"caf\xe9\xff")],
    [(b"authorization", b"Bearer \xff\xfe")],
    [(b"x-timestamp", b"9" * 400), (b"x-signature", b"00")],
    [(b"content-type", b"application/json; charset=\xff")],
    [(b"content-length", b"9" * 30)],
]


def test_hostile_bodies_and_headers_on_every_operation_are_never_a_5xx(server: Server) -> None:
    """Beyond what schemathesis generates from the document: every operation of the schema,
    with bodies nested a thousand levels deep, integers of hundreds of digits, non-UTF-8
    bytes, and hostile header values."""
    import httpx

    schema = httpx.get(f"{server.url}/schema/openapi.json").json()
    auth = (b"authorization", f"Bearer {TOKEN}".encode())
    failures = []
    sent = 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path, operations in schema["paths"].items():
            url = path.replace("{", "").replace("}", "")  # path parameters as literals
            for method in operations:
                if method not in ("get", "post", "put", "delete"):
                    continue
                tries = [
                    ([auth, (b"content-type", b"application/json")], b) for b in HOSTILE_BODIES
                ]
                tries += [
                    ([auth, *h], b"{}") for h in HOSTILE_HEADERS if b"content-length" not in h[0][0]
                ]
                for headers, body in tries:
                    content = body if method in ("post", "put") else None
                    r = client.request(
                        method.upper(), url + "?from=" + "9" * 400, content=content, headers=headers
                    )
                    sent += 1
                    if r.status_code >= 500:
                        failures.append((method, path, headers[-1][0], body[:20], r.status_code))
    assert failures == [], f"{failures[:10]}\n{server.output()}"
    assert sent > 200, sent  # every operation was tried

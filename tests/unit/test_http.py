"""The HTTP shell's contract, read off the built app: who may call each operation, and that
/schema describes every answer. (Behaviour over HTTP: tests/integration/test_api*.py.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute

from controlplane.config import Config
from controlplane.flags import FLAGS
from controlplane.http.app import create_app

CONSOLE_PAGES = ("", "/parity", "/ledger", "/cutover", "/orgs", "/audit")
CUTOVER_STEPS = ("plan", "preflight", "execute", "rollback")
# (method, path) -> the guard and what it asks for; OPTIONS and litestar's own answers aside
ACCESS = {
    ("POST", "/v1/events"): ("require_scope", "ingest"),
    ("GET", "/v1/usage"): ("require_scope", "read"),
    ("GET", "/v1/ledger"): ("require_scope", "read"),
    ("GET", "/v1/flags"): ("require_scope", "read"),
    ("GET", "/v1/flags/audit"): ("require_scope", "read"),
    **{("PUT", f"/v1/flags/{flag}"): ("require_scope", "admin") for flag in FLAGS},
    ("GET", "/v1/orgs/{org_id:str}"): ("require_scope", "read"),
    ("PUT", "/v1/orgs/{org_id:str}"): ("require_scope", "admin"),
    ("GET", "/v1/jobs"): ("require_scope", "read"),
    ("GET", "/v1/catalog"): ("require_scope", "read"),
    ("GET", "/v1/cutover"): ("require_scope", "read"),
    ("POST", "/v1/cutover/plan"): ("require_scope", "admin"),
    ("POST", "/v1/cutover/preflight"): ("require_scope", "admin"),
    ("POST", "/v1/cutover/execute"): ("require_scope", "admin"),
    ("POST", "/v1/cutover/rollback"): ("require_scope", "admin"),
    ("GET", "/v1/seam"): ("require_scope", "read"),
    ("POST", "/ofrep/v1/evaluate/flags"): ("require_scope", "read"),
    ("POST", "/ofrep/v1/evaluate/flags/{key:str}"): ("require_scope", "read"),
    ("GET", "/v1/parity/runs"): ("any_scope", ("read", "parity")),
    ("GET", "/v1/parity/runs/{run_id:int}"): ("any_scope", ("read", "parity")),
    ("GET", "/v1/parity/clean-since"): ("any_scope", ("read", "parity")),
    ("GET", "/internal/usage-parity"): ("parity_auth", None),  # a token, or a signature
    ("GET", "/internal/money-parity"): ("parity_auth", None),  # the same auth
    ("GET", "/v1/parity/money-runs"): ("any_scope", ("read", "parity")),
    ("GET", "/v1/parity/money-runs/{run_id:int}"): ("any_scope", ("read", "parity")),
    ("GET", "/v1/reconciliation"): ("require_scope", "read"),
    ("GET", "/v1/reconciliation/runs"): ("require_scope", "read"),
    ("GET", "/metrics"): ("metrics_auth", None),  # a token only when configured
    ("GET", "/healthz"): (None, None),
    ("GET", "/readyz"): (None, None),
    ("POST", "/webhooks/stripe"): (None, None),  # its signature
    ("POST", "/webhooks/stripe/thin"): (None, None),  # its signature
    ("POST", "/v1/orgs/{org_id:str}/capabilities"): ("require_scope", "admin"),
    ("POST", "/v1/orgs/{org_id:str}/release-provider-errors"): ("require_scope", "admin"),
    ("GET", "/.well-known/jwks.json"): (None, None),  # public keys, for offline verification
    # the console (controlplane/http/console): a session cookie, its CSRF token on every form
    **{("GET", f"/console{p}"): ("console_session", "read") for p in CONSOLE_PAGES},
    **{("POST", f"/console/cutover/{s}"): ("console_session", "admin") for s in CUTOVER_STEPS},
    ("POST", "/console/orgs/capabilities"): ("console_session", "admin"),
    ("GET", "/console/sign-in"): ("console_session", None),
    ("POST", "/console/sign-in"): ("console_session", None),  # the token, and its CSRF token
    ("POST", "/console/sign-out"): ("console_session", "read"),
    ("GET", "/console/static/{file_path:path}"): (None, None),  # the stylesheet
}
OPEN_IN_SCHEMA = {  # no bearer token in the document
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/internal/usage-parity"),
    ("get", "/internal/money-parity"),
    ("post", "/webhooks/stripe"),
    ("post", "/webhooks/stripe/thin"),
    ("get", "/.well-known/jwks.json"),
}


@pytest.fixture
def app(make_config: Callable[..., Config]) -> Litestar:
    return create_app(make_config())


def _access(app: Litestar) -> dict[tuple[str, str], tuple[str | None, Any]]:
    found: dict[tuple[str, str], tuple[str | None, Any]] = {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for method, (handler, _) in route.route_handler_map.items():
            if method in ("OPTIONS", "HEAD"):
                continue
            guards = [g.__name__ for layer in handler.ownership_layers for g in layer.guards or []]
            assert len(guards) <= 1, (method, route.path, guards)  # declared once
            guard = guards[0] if guards else None
            wants = handler.opt.get("scope", handler.opt.get("scopes"))
            found[(method, route.path)] = (guard, wants)
    return {k: v for k, v in found.items() if not k[1].startswith("/schema")}


def test_every_operation_asks_for_what_it_should(app: Litestar) -> None:
    assert _access(app) == ACCESS


def test_options_on_an_org_needs_no_token(app: Litestar) -> None:
    [route] = [r for r in app.routes if r.path == "/v1/orgs/{org_id:str}"]
    assert isinstance(route, HTTPRoute)
    handler, _ = route.route_handler_map["OPTIONS"]
    assert handler.opt["scope"] is None


def test_schema_describes_every_answer_and_who_may_ask(app: Litestar) -> None:
    document = app.openapi_schema.to_schema()
    operations = [
        (method, path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "responses" in operation
    ]
    api = [k for k in ACCESS if not k[1].startswith("/console")]  # the console is HTML
    assert len(operations) == len(api)
    for method, path, operation in operations:
        [answer] = [a for s, a in operation["responses"].items() if s.startswith("2")]
        if path == "/metrics":
            continue  # text, not JSON
        schema = answer["content"]["application/json"]["schema"]
        name = schema["$ref"].removeprefix("#/components/schemas/")
        assert document["components"]["schemas"][name]["properties"], (method, path)
        bearer = (method, path) not in OPEN_IN_SCHEMA
        assert (operation.get("security") == [{"bearer": []}]) is bearer, (method, path)


def test_schema_names_the_configured_plans(app: Litestar) -> None:
    """An unknown plan is refused, so the document offers only the configured ones."""
    body = app.openapi_schema.to_schema()["components"]["schemas"]["OrgPut"]
    assert body["properties"]["plan"] == {"anyOf": [{"enum": ["free", "pro"]}, {"type": "null"}]}


def test_the_ledger_api_shows_every_field_of_a_ledger_row() -> None:
    """`LedgerEntry` is `LedgerRow` as JSON shows it (`value` for `value_micros`): a column
    added to the ledger must be added to the API too, or this fails."""
    from controlplane.http.controllers.usage import LedgerEntry
    from controlplane.ledger import LedgerRow

    row = [f for f in LedgerRow.__struct_fields__ if f != "value_micros"]
    assert list(LedgerEntry.__struct_fields__) == [*row, "value"]

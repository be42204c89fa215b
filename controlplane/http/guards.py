"""Who may call what. A controller names its guard once, with the scope it needs in `opt`:
``opt={"scope": "read"}`` for one scope, ``opt={"scopes": (...)}`` for any of several.

The principal a guard admits is kept in ``request.state.principal``; :func:`actor` names it in
audit records.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from controlplane.auth import Forbidden, Principal, TokenStore, Unauthorized
from controlplane.core import ControlPlane
from controlplane.parity import verify_signature
from controlplane.secrets import reveal

BEARER: list[dict[str, list[str]]] = [{"bearer": []}]  # the OpenAPI security requirement


def require_scope(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """A bearer token with the scope `opt["scope"]`; a handler setting it to None is open."""
    scope = handler.opt["scope"]
    if scope is None:
        return
    tokens: TokenStore = connection.app.state.tokens
    connection.state.principal = tokens.authorize(connection.headers.get("authorization"), scope)


def any_scope(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """A bearer token with at least one of the scopes `opt["scopes"]`."""
    tokens: TokenStore = connection.app.state.tokens
    principal = tokens.authenticate(connection.headers.get("authorization"))
    scopes: tuple[str, ...] = handler.opt["scopes"]
    if not principal.scopes & set(scopes):
        raise Forbidden(f"token {principal.name!r} needs one of the scopes {list(scopes)}")
    connection.state.principal = principal


def parity_auth(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """A bearer token with the `parity` scope, or a request signed with `parity.hmac_secret`
    (X-Timestamp, X-Signature; see :mod:`controlplane.parity`)."""
    headers = connection.headers
    if "x-signature" not in headers and "x-timestamp" not in headers:
        tokens: TokenStore = connection.app.state.tokens
        connection.state.principal = tokens.authorize(headers.get("authorization"), "parity")
        return
    cp: ControlPlane = connection.app.state.cp
    secret = cp.config.parity.hmac_secret
    if secret is None:
        raise Unauthorized("signed requests are not enabled (parity.hmac_secret); use a token")
    verify_signature(
        reveal(secret, "parity.hmac_secret"),
        headers.get("x-timestamp"),
        headers.get("x-signature"),
        connection.scope["path"],
        connection.scope.get("query_string", b"").decode("latin-1"),
        cp.clock(),
    )
    connection.state.principal = Principal(name="hmac", scopes=frozenset({"parity"}))


def metrics_auth(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Open like /healthz, unless `server.metrics_require_token`: then the `read` scope."""
    cp: ControlPlane = connection.app.state.cp
    if cp.config.server.metrics_require_token:
        tokens: TokenStore = connection.app.state.tokens
        connection.state.principal = tokens.authorize(
            connection.headers.get("authorization"), "read"
        )


def actor(request: Request[Any, Any, Any]) -> str:
    """The name of the principal a guard admitted, for audit records."""
    principal: Principal = request.state.principal
    return principal.name

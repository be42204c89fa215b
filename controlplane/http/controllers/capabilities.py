"""Capability tokens: issued for an org (scope `admin`), and the public keys that verify them
offline (`/.well-known/jwks.json`, no token)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import FromPath

from controlplane.capabilities import Issued
from controlplane.http.guards import BEARER, actor, require_scope
from controlplane.http.params import CP
from controlplane.http.problems import AUTH, documented


class JsonWebKey(msgspec.Struct):
    kty: str
    crv: str
    x: str
    kid: str
    alg: str
    use: str


class JsonWebKeySet(msgspec.Struct):
    keys: list[JsonWebKey]


class CapabilitiesController(Controller):
    """Issuing needs `admin`."""

    path = "/v1/orgs/{org_id:str}/capabilities"
    tags = ["capabilities"]
    security = BEARER
    guards = [require_scope]
    opt = {"scope": "admin"}

    @post(
        status_code=200,
        summary="Issue a signed capability token stating the org's plan now",
        responses=documented(*AUTH, 400, 404),
    )
    async def issue_capability(
        self, request: Request[Any, Any, Any], cp: CP, org_id: FromPath[str]
    ) -> Issued:
        return await cp.issue_capability(org_id, actor=actor(request))


class JwksController(Controller):
    """The public keys, open to every service that verifies tokens offline."""

    path = "/.well-known/jwks.json"
    tags = ["capabilities"]

    @get(summary="The public keys that verify capability tokens (a JWK Set, RFC 7517)")
    async def jwks(self, cp: CP) -> JsonWebKeySet:
        return msgspec.convert(cp.capability_keys.jwks(), JsonWebKeySet)

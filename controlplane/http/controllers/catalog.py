"""`GET /v1/catalog`: the published price catalog."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, get
from litestar.params import QueryParameter

from controlplane.errors import NotFound
from controlplane.http.guards import BEARER, require_scope
from controlplane.http.params import CP, MAX_ID
from controlplane.http.problems import AUTH, documented


class PublishedCatalog(msgspec.Struct):
    """A catalog version; every field null when none was published yet."""

    version: int | None
    published_at: int | None
    actor: str | None
    digest: str | None
    catalog: dict[str, Any] | None  # with the provider's resolved ids


class CatalogController(Controller):
    path = "/v1/catalog"
    tags = ["catalog"]
    security = BEARER
    guards = [require_scope]
    opt = {"scope": "read"}

    @get(summary="The newest published price catalog", responses=documented(*AUTH, 400, 404))
    async def get_catalog(
        self,
        cp: CP,
        version: Annotated[
            int | None,
            QueryParameter(ge=1, le=MAX_ID, schema_extra={"minimum": 1, "maximum": MAX_ID}),
        ] = None,
    ) -> PublishedCatalog:
        found = await cp.catalog(version)
        if found is None and version is not None:
            raise NotFound(f"no catalog version {version}")
        if found is None:
            return PublishedCatalog(None, None, None, None, None)
        return msgspec.convert(msgspec.to_builtins(found), PublishedCatalog)

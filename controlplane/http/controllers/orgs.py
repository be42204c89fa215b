"""`/v1/orgs/{org_id}`: an org's provider customer and plan history."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, HttpMethod, Request, Response, get, post, put, route
from litestar.params import FromPath, JSONBody

from controlplane.errors import NotFound
from controlplane.http.guards import BEARER, actor, require_scope
from controlplane.http.params import CP, Instant, seconds, strict_body
from controlplane.http.problems import AUTH, BODY, documented
from controlplane.interfaces import Org, PlanPeriod
from controlplane.provider_errors import Released


class OrgPut(msgspec.Struct, forbid_unknown_fields=True):
    customer: str | None = None
    plan: str | None = None
    effective_from: Instant | None = None
    reason: str | None = None
    force: bool = False  # a plan period before buckets already rolled up


class ReleaseBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]


class OrgDetails(msgspec.Struct):
    org_id: str
    customer: str | None
    plan: str | None  # the newest plan period's
    plans: list[PlanPeriod]  # oldest first
    updated_at: int
    subscription: str | None
    subscription_status: str | None
    # the provider's code when it reported the customer missing (cleared when one is set)
    customer_error: str | None

    @classmethod
    def of(cls, org: Org) -> OrgDetails:
        return cls(**_details(org))


class OrgChanged(OrgDetails):
    """The org as changed, and what the change means for usage already rolled up."""

    notes: list[str]


def _details(org: Org) -> dict[str, Any]:
    return {
        "org_id": org.org_id,
        "customer": org.customer,
        "plan": org.plans[-1].plan if org.plans else None,
        "plans": org.plans,
        "updated_at": org.updated_at,
        "subscription": org.subscription,
        "subscription_status": org.subscription_status,
        "customer_error": org.customer_error,
    }


class OrgsController(Controller):
    """A read needs the `read` scope; a change needs `admin`; OPTIONS needs no token."""

    path = "/v1/orgs/{org_id:str}"
    tags = ["orgs"]
    security = BEARER
    guards = [require_scope]
    opt = {"scope": "read"}

    @route(
        http_method=HttpMethod.OPTIONS,
        opt={"scope": None},
        include_in_schema=False,
        status_code=204,
    )
    async def allowed_methods(self) -> Response[None]:
        """OPTIONS, with no token. litestar's own answer would list the methods of only one of
        the handlers sharing this path. Named to sort first: litestar registers a controller's
        handlers in name order, and keeps its own OPTIONS handler if another comes first."""
        return Response(None, status_code=204, headers={"Allow": "GET, OPTIONS, PUT"})

    @put(
        opt={"scope": "admin"},
        summary="Set an org's customer or plan",
        responses=documented(*AUTH, *BODY),
        before_request=strict_body(OrgPut),
    )
    async def put_org(
        self,
        request: Request[Any, Any, Any],
        cp: CP,
        org_id: FromPath[str],
        data: JSONBody[OrgPut],
    ) -> OrgChanged:
        update = await cp.set_org(
            org_id,
            customer=data.customer,
            plan=data.plan,
            actor=actor(request),
            effective_from=seconds(data.effective_from, "effective_from"),
            reason=data.reason,
            force=data.force,
        )
        return OrgChanged(**_details(update.org), notes=update.notes)

    @get(summary="An org's customer and plan history", responses=documented(*AUTH, 404))
    async def get_org(self, cp: CP, org_id: FromPath[str]) -> OrgDetails:
        org = await cp.org(org_id)
        if org is None:
            raise NotFound(f"no org {org_id!r}")
        return OrgDetails.of(org)

    @post(
        "/release-provider-errors",
        opt={"scope": "admin"},
        status_code=200,
        summary="Re-issue the org's rows held for a provider error",
        responses=documented(*AUTH, *BODY, 409),
        before_request=strict_body(ReleaseBody),
    )
    async def release_provider_errors(
        self,
        request: Request[Any, Any, Any],
        cp: CP,
        org_id: FromPath[str],
        data: JSONBody[ReleaseBody],
    ) -> Released:
        """Each `held`/`provider_error` row moves to `cancelled`/`reissued` and its usage to
        the bucket's next revision, `pending`, under a new identifier (Stripe keeps the old one
        and would answer it as a duplicate). 409 while the org's customer is flagged."""
        return await cp.release_provider_errors(org_id, actor=actor(request), reason=data.reason)

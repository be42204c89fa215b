"""Releasing rows held for a provider error: their usage re-issued under a new identifier.

A `held`/`provider_error` row was accepted by the provider (HTTP 200) and later reported invalid
(a Stripe error report: unknown customer, no customer key, no meter...). Stripe never counted
it, but it keeps the identifier: a resend under the same identifier within at least 24 hours is
answered "An event already exists with identifier ...", which the sender rightly takes as
delivered, so resending the row as it is would bill nothing (under billing). Past Stripe's
memory the identifier would be accepted again, but nothing tells the two cases apart.

So releasing re-issues: the held row moves to `cancelled`/`reissued` and the next revision of
its bucket, with the same value and quantity, is appended `pending` under its own identifier
(:meth:`~controlplane.interfaces.SendStore.reissue_rows`, audited ``ledger.reissued``). The
usage is in exactly one billing row, and it cannot be billed twice: the reported event never
counted. Rows reported as ``meter_event_customer_not_found`` are released only once the org's
customer has been set again (its ``customer_error`` cleared): releasing them earlier would only
be reported again.
"""

from __future__ import annotations

import msgspec

from controlplane.errors import ReleaseRefused
from controlplane.interfaces import Storage
from controlplane.ledger import CUSTOMER_NOT_FOUND, Reason, RowState


class Released(msgspec.Struct, frozen=True):
    """What a release did: the held rows, and the revisions that now carry their usage."""

    org_id: str
    released: list[str]  # identifiers of the held rows, now cancelled/reissued
    reissued_as: list[str]  # the new pending revisions' identifiers, in the same order


async def release_provider_errors(
    storage: Storage, org_id: str, *, at: int, actor: str, reason: str
) -> Released:
    """Re-issue every `held`/`provider_error` row of `org_id` (see the module docstring);
    ReleaseRefused, changing nothing, while its customer is still flagged."""
    rows = [
        r
        for r in await storage.ledger(org_id=org_id, state=RowState.HELD, limit=100_000)
        if r.reason == Reason.PROVIDER_ERROR
    ]
    if not rows:
        return Released(org_id, [], [])
    org = await storage.get_org(org_id)
    if any(r.detail == CUSTOMER_NOT_FOUND for r in rows) and (
        org is None or org.customer_error is not None
    ):
        raise ReleaseRefused(
            f"org {org_id}: Stripe reported its customer missing ({CUSTOMER_NOT_FOUND}); set "
            "the org's customer first (PUT /v1/orgs/{org}), then release"
        )
    new = await storage.reissue_rows([r.id for r in rows], at, actor, f"released: {reason}")
    return Released(org_id, [r.identifier for r in rows], [n.identifier for n in new])

"""The ledger: the durable outbox of meter events, one row per (org, meter, bucket, revision).

A row's state says where its usage is (DESIGN §2.1): still to deliver (`pending`), delivered
(`sent`), parked with a reason (`held`), never billed here by rule (`excluded`) or handed back
to the legacy biller by a rollback (`cancelled`).
"""

from __future__ import annotations

import enum
import hashlib

import msgspec

from controlplane.units import format_micros

MAX_IDENTIFIER_LENGTH = 100


class RowState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    HELD = "held"
    EXCLUDED = "excluded"
    CANCELLED = "cancelled"


class Reason(enum.StrEnum):
    """Why a row is not (or no longer) pending."""

    NO_CUSTOMER = "no_customer"
    PROVIDER_REJECTED = "provider_rejected"
    AMBIGUOUS = "ambiguous"
    BEFORE_BILL_FROM = "before_bill_from"
    FREE_PLAN = "free_plan"
    TOO_OLD = "too_old"
    ROLLED_BACK = "rolled_back"
    REISSUED = "reissued"  # reached the provider after its invoice was finalized: sent again
    PROVIDER_ERROR = "provider_error"  # accepted, then reported invalid by the provider
    PROVIDER_MISSING = "provider_missing"  # sent, and absent from the provider's aggregates
    OFFSET = "offset"  # handed back by a rollback through an offsetting row (`offsets_id`)
    CREDITED = "credited"  # handed back by a rollback through a credit note on its invoice


CUSTOMER_NOT_FOUND = "meter_event_customer_not_found"
"""The provider's error-report code that flags the org's customer mapping."""

BILLABLE = "billable"
EXCLUDING = (Reason.FREE_PLAN, Reason.BEFORE_BILL_FROM, Reason.TOO_OLD)
UNBILLED = (*EXCLUDING, Reason.ROLLED_BACK, Reason.REISSUED, Reason.OFFSET, Reason.CREDITED)


def segment(reason: str | None, offsets: int | None = None) -> str:
    """The rounding chain a row belongs to: rows billed here never share a carry with rows
    excluded by rule, or handed back to the legacy biller by a rollback, so no fraction of a
    unit moves between billed and unbilled usage (nor into the next cutover). An offsetting
    row (`offsets` the row it takes back) shares the chain of the row it offsets."""
    if offsets is not None:
        return Reason.OFFSET
    return reason if reason in UNBILLED else BILLABLE


def identifier(org_id: str, meter: str, bucket_start: int, revision: int) -> str:
    """The row's deterministic identifier, also used as the provider's idempotency key.

    `{org}:{meter}:{bucket_start}:{revision}`, or a stable hash of it when that is longer
    than the provider accepts (100 characters).
    """
    plain = f"{org_id}:{meter}:{bucket_start}:{revision}"
    if len(plain) <= MAX_IDENTIFIER_LENGTH:
        return plain
    return "h:" + hashlib.sha256(plain.encode()).hexdigest()


class NewRow(msgspec.Struct, frozen=True):
    """A revision the rollup appends to the ledger."""

    org_id: str
    meter: str
    bucket_start: int
    bucket_end: int
    revision: int
    value_micros: int
    quantity: int
    state: RowState
    reason: str | None = None
    detail: str | None = None
    plan_source: str | None = None  # the plan authority chain's link: token, stored, legacy...

    @property
    def identifier(self) -> str:
        return identifier(self.org_id, self.meter, self.bucket_start, self.revision)


class LedgerRow(msgspec.Struct, frozen=True):
    """A stored ledger row."""

    id: int
    identifier: str
    org_id: str
    meter: str
    bucket_start: int
    bucket_end: int
    revision: int
    value_micros: int
    quantity: int
    state: RowState
    reason: str | None
    detail: str | None
    attempts: int
    first_attempt_at: int | None
    provider_id: str | None
    created_at: int
    updated_at: int
    sent_at: int | None = None
    # the current series of attempts: what a retry repeats (see Sender)
    attempt_customer: str | None = None
    attempt_timestamp: int | None = None
    attempt_key: str | None = None  # the idempotency key
    last_attempt_at: int | None = None
    plan_source: str | None = None  # which link of the plan authority chain priced it
    offsets_id: int | None = None  # an offsetting row: the row it takes back at the provider

    def to_api(self) -> dict[str, object]:
        """The row as the API shows it: `value` as an exact decimal string."""
        out = msgspec.structs.asdict(self)
        del out["value_micros"]
        out["value"] = format_micros(self.value_micros)
        return out

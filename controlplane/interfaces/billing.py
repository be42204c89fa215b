"""The billing provider contract: what the sender delivers meter events through, and the
provider-specific work a billing plugin may also offer.

:class:`Billing` is required of every billing plugin. The rest is optional and declared by
subclassing, the way a legacy source lists its :class:`~controlplane.interfaces.LegacyCapability`:
the core asks ``isinstance(billing, CatalogPublisher)``, never for a plugin's class.

- :class:`CatalogPublisher`: make the provider's meters, products and prices match
  ``[catalog]`` and store the resolved ids as a catalog version;
- :class:`InvoicePreviewer`: the provider's own preview of a subscription's upcoming invoice
  (money parity's third number);
- :class:`WebhookReceiver`: the provider's signed webhook deliveries, verified and applied.
  The core builds one from what it needs (storage, its config section, a clock, the billing
  plugin, and the callbacks :data:`TrueUpCallback` and :data:`ReissueCallback`).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar

import msgspec

from controlplane.errors import ControlPlaneError
from controlplane.interfaces.records import CatalogVersion, ClosedPeriod
from controlplane.interfaces.storage import CatalogStore


class MeterEvent(msgspec.Struct, frozen=True):
    """One ledger row as the provider receives it."""

    identifier: str
    event_name: str
    customer: str
    value: int  # whole units
    timestamp: int  # unix seconds: inside the row's bucket, or the current billing period
    idempotency_key: str = ""  # "": the identifier


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"  # the provider took it
    DUPLICATE = "duplicate"  # the provider already had this identifier: delivered before
    REJECTED = "rejected"  # permanent refusal; resending will not help
    RETRY = "retry"  # transient (rate limit, 5xx); nothing was recorded, try later
    AMBIGUOUS = "ambiguous"  # the call may or may not have been applied (timeout, drop)


class Delivery(msgspec.Struct, frozen=True):
    outcome: Outcome
    message: str | None = None
    provider_id: str | None = None
    retry_after: float | None = None
    # ACCEPTED with the provider's saved answer to an earlier call under the same key: the
    # event arrived with that earlier call, not this one
    replayed: bool = False


class Billing(abc.ABC):
    """A billing provider that takes meter events."""

    name: ClassVar[str]
    max_event_age_seconds: ClassVar[int | None] = None
    """Oldest event timestamp the provider accepts, relative to now (None: no limit)."""
    throttled: int = 0
    """Rate-limit answers (HTTP 429) the provider gave since start, retried ones included."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def rate_limit(self) -> float | None:
        """Calls per second the sender may make (None: unlimited)."""

    @abc.abstractmethod
    async def send(self, event: MeterEvent) -> Delivery:
        """Deliver one meter event, using `event.identifier` as the idempotency key."""

    @abc.abstractmethod
    async def cancel(self, event_name: str, identifier: str) -> Delivery:
        """Cancel a delivered meter event by identifier (where the provider allows it)."""


# optional capabilities ---------------------------------------------------------------------------


class CatalogAction(msgspec.Struct, frozen=True):
    """One step of a catalog publish: `create`, `update`, `reactivate` or `keep`."""

    kind: str
    what: str  # "meter" | "product" | "price"
    key: str
    detail: str = ""


class PublishResult(msgspec.Struct, frozen=True):
    """What a catalog publish did (or, in a dry run, would do)."""

    actions: list[CatalogAction]
    dry_run: bool
    changed: bool  # a new version was (or, in a dry run, would be) stored
    version: CatalogVersion | None  # the version now in force (None: nothing published yet)


class CatalogPublisher(abc.ABC):
    """Optional capability of a :class:`Billing` plugin: publish the price catalog."""

    @abc.abstractmethod
    async def publish_catalog(
        self,
        store: CatalogStore,
        catalog: Any,
        meters: Sequence[Any],
        *,
        actor: str,
        dry_run: bool,
        now: Callable[[], int],
    ) -> PublishResult:
        """Make the provider match `catalog` (the ``[catalog]`` section, a
        :class:`controlplane.config.CatalogConfig`) and every configured meter (`meters`,
        :class:`controlplane.meters.MeterConfig`), then store the resolved catalog in `store`
        as a new version stamped `now()`, unless it equals the newest one. With `dry_run`
        the provider is only read and nothing is stored. (The config types sit above the
        contracts, hence `Any` here.)"""


class MeterSummaries(abc.ABC):
    """Optional capability of a :class:`Billing` plugin: the provider's own aggregates of the
    meter events it holds (what it will invoice), for reconciling the ledger with them."""

    @abc.abstractmethod
    async def hourly_usage(
        self, customer: str, event_name: str, start: int, end: int
    ) -> dict[int, int]:
        """Whole units the provider holds for `customer` on the meter of `event_name`, per
        hour of the events' timestamps in [start, end) (hour-aligned unix seconds): hour start
        -> units, hours holding none left out."""


class CreditNoted(msgspec.Struct, frozen=True):
    """A credit note the provider issued for usage on a finalized invoice, minor units."""

    credit_note: str  # the provider's id
    invoice: str
    quantities: dict[str, int]  # per provider event name, the units its line was credited
    amounts: dict[str, int]  # per provider event name, what its line was credited
    currency: str


class CreditNotes(abc.ABC):
    """Optional capability of a :class:`Billing` plugin: credit usage a finalized invoice
    billed (the last resort of a rollback, for usage neither cancel nor offset can reach)."""

    @abc.abstractmethod
    async def credit_usage(
        self, invoice: str, lines: Mapping[str, int], *, memo: str, key: str
    ) -> CreditNoted:
        """Credit, in one credit note, `lines[event_name]` units of the invoice's metered line
        of each event name's meter: all of them, or none. Once per `key`: a note issued
        under it before (an answer lost, even past the provider's idempotency window) is
        returned as it is (its quantities may differ from `lines`), not issued again. Raises
        BillingUnanswered without a definite answer, and BillingError when the provider
        refuses (an invoice not open or paid, no such line, more than it holds...)."""


class PreviewLine(msgspec.Struct, frozen=True):
    """One line of a provider's invoice preview, amounts in minor units."""

    price: str  # the provider's price id
    quantity: int
    amount: int
    credit: int


class InvoicePreview(msgspec.Struct, frozen=True):
    """The provider's preview of a subscription's upcoming invoice, in minor units."""

    currency: str
    period_start: int
    period_end: int
    subtotal: int
    total: int
    lines: list[PreviewLine]


class InvoicePreviewer(abc.ABC):
    """Optional capability of a :class:`Billing` plugin: preview a subscription's invoice."""

    @abc.abstractmethod
    async def preview_invoice(self, customer: str, subscription: str) -> InvoicePreview:
        """The provider's preview of `subscription`'s invoice for its current period. Raises
        BillingError when the provider refuses or fails."""


WEBHOOK_ALERTS = "job:webhooks"
"""Where a webhook receiver stores its alerts (:attr:`ParityAlert.meter`, as a job's)."""


class WebhookRejected(ControlPlaneError):
    """The webhook's signature or body is not valid; nothing was done."""


class NotAnEvent(WebhookRejected):
    """The body is correctly signed but is not a provider event; nothing was done."""


class WebhookResult(msgspec.Struct, frozen=True):
    """What one webhook delivery was answered: the event, and what was done with it."""

    event_id: str
    type: str
    outcome: str
    duplicate: bool = False


class TrueUp(msgspec.Struct, frozen=True):
    """One org's usage rolled up and sent up to a time (an invoice's true-up)."""

    rows: int  # ledger rows the rollup wrote
    sent: int  # rows delivered
    undelivered: int  # rows not delivered yet (to retry, or ambiguous)
    skipped: str | None = None  # why sending was skipped, if it was


TrueUpCallback = Callable[[str, int], Awaitable[TrueUp]]
"""Roll up (grace ignored) and send one org's buckets before a time: ``(org_id, until)``."""

ReissueCallback = Callable[[ClosedPeriod], Awaitable[object]]
"""Re-issue the rows that reached the provider after a period's invoice was finalized."""


class WebhookReceiver(abc.ABC):
    """A provider's signed webhook deliveries, verified and applied."""

    @abc.abstractmethod
    async def receive(self, body: bytes, signature: str | None) -> WebhookResult:
        """Verify and process one delivery (its raw body and signature header). Raises
        WebhookRejected (NotAnEvent for a signed body that is not an event) when nothing was
        done."""

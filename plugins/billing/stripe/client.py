"""Stripe Billing Meters, through the official ``stripe`` SDK (async calls over httpx).

Config::

    [billing]
    backend = "stripe"
    api_key = { env = "STRIPE_API_KEY" }
    api_base = "http://127.0.0.1:12111"   # omit for real Stripe; this is the emulator
    rate_limit = 25.0                      # calls/s the sender may make (test mode allows 25)

Each meter event is sent with ``identifier`` = the ledger row identifier, the same value as the
``Idempotency-Key`` (a retry re-stamped after its invoice was finalized uses
``{identifier}@{timestamp}``, see the sender), ``timestamp`` and
``payload = {stripe_customer_id, value}``. The SDK's own retries are off;
:meth:`StripeBilling.send` retries here, with the same idempotency key, on 429 (honouring
``Retry-After``), 409, 5xx and connection errors, with capped exponential backoff and full
jitter, and then answers:

==========================================================  ==========================
what Stripe said (after retries)                             outcome
==========================================================  ==========================
200, or the saved 200 replayed for the same key              ACCEPTED
400 "An event already exists with identifier ..."             DUPLICATE
400 ``idempotency_error`` (the key was used before with       AMBIGUOUS: Stripe saves a key's
other parameters)                                             answer once the first request
                                                              began, so that one may be applied
other 4xx                                                     REJECTED, Stripe's message
401/403 (the API key, not the event, is wrong)                RETRY
429 / 409 / 5xx on every attempt                              RETRY (``retry_after`` set)
a connection error or timeout on any attempt, and no
definite answer after it                                      AMBIGUOUS
a 5xx replayed for the key (Stripe saved an error after the
write had begun)                                              AMBIGUOUS
==========================================================  ==========================

A repeated identical send within Stripe's 24 h memory is answered with the saved first
response, so it comes back ACCEPTED, not DUPLICATE; DUPLICATE means the identifier reached
Stripe under another idempotency key. The API key never appears in logs or messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, ClassVar, TypeVar

import stripe
import structlog

from controlplane.config import CatalogConfig
from controlplane.errors import BillingError
from controlplane.interfaces import (
    Billing,
    CatalogPublisher,
    CatalogStore,
    CreditNoted,
    CreditNotes,
    Delivery,
    InvoicePreview,
    InvoicePreviewer,
    MeterEvent,
    MeterSummaries,
    Outcome,
    PluginConfig,
    PreviewLine,
    PublishResult,
)
from controlplane.meters import MeterConfig
from controlplane.plugins.billing.stripe.catalog import publish as _publish
from controlplane.plugins.billing.stripe.catalog import stripe_call
from controlplane.plugins.billing.stripe.credit_notes import credit_usage as _credit_usage
from controlplane.registry import PluginSpec
from controlplane.secrets import Secret, reveal

log = structlog.get_logger("billing.stripe")

T = TypeVar("T")

DUPLICATE_MESSAGE = "An event already exists with identifier"
CUSTOMER_KEY = "stripe_customer_id"
VALUE_KEY = "value"


class StripeBillingConfig(PluginConfig, tag="stripe", tag_field="backend", frozen=True):
    """The ``[billing]`` section for ``backend = "stripe"``."""

    api_key: Secret
    api_base: str | None = None  # None: api.stripe.com; e.g. "http://127.0.0.1:12111"
    rate_limit: float = 25.0  # calls per second the sender may make
    max_retries: int = 4  # retries inside one send, after the first attempt
    timeout_seconds: float = 10.0  # per HTTP call
    backoff_base_seconds: float = 0.25
    backoff_cap_seconds: float = 5.0  # also the longest Retry-After waited out inside a send

    def __post_init__(self) -> None:
        if not self.rate_limit > 0:
            raise ValueError("rate_limit must be positive")
        if self.max_retries < 0:
            raise ValueError("max_retries must not be negative")
        if not self.timeout_seconds > 0:
            raise ValueError("timeout_seconds must be positive")
        if self.backoff_base_seconds < 0 or self.backoff_cap_seconds < self.backoff_base_seconds:
            raise ValueError("need 0 <= backoff_base_seconds <= backoff_cap_seconds")

    def __repr__(self) -> str:
        key = repr(self.api_key) if not isinstance(self.api_key, str) else "'<secret>'"
        return (
            f"StripeBillingConfig(api_key={key}, api_base={self.api_base!r}, "
            f"rate_limit={self.rate_limit!r}, max_retries={self.max_retries!r}, "
            f"timeout_seconds={self.timeout_seconds!r})"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class _Failure:
    """One failed call, classified."""

    outcome: Outcome  # the answer if no further attempt is made
    message: str
    retryable: bool
    ambiguous: bool = False  # the write may have been applied
    retry_after: float | None = None
    error: stripe.StripeError | None = None


class StripeBilling(Billing, CatalogPublisher, CreditNotes, InvoicePreviewer, MeterSummaries):
    """Meter events, cancellations and meter totals on Stripe (or the Stripe emulator), the
    price catalog published to it, and its invoice previews."""

    name: ClassVar[str] = "stripe"
    max_event_age_seconds: ClassVar[int | None] = 35 * 86400

    def __init__(
        self,
        config: StripeBillingConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._client: stripe.StripeClient | None = None
        self._http: stripe.HTTPXClient | None = None
        self._api_key = ""
        self._meter_ids: dict[str, str] = {}
        self._meters_read = asyncio.Lock()  # concurrent first reads list the meters once

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None:
            return
        self._api_key = reveal(self.config.api_key, "billing.api_key")
        self._http = stripe.HTTPXClient(timeout=self.config.timeout_seconds)
        self._client = stripe.StripeClient(
            self._api_key,
            base_addresses={"api": self.config.api_base} if self.config.api_base else None,
            http_client=self._http,
            max_network_retries=0,  # retries are ours: same key, our backoff, our verdicts
        )

    async def close(self) -> None:
        http, self._http, self._client = self._http, None, None
        if http is not None:
            await http.close_async()  # type: ignore[no-untyped-call]

    @property
    def rate_limit(self) -> float | None:
        return self.config.rate_limit

    @property
    def client(self) -> stripe.StripeClient:
        if self._client is None:
            raise BillingError("the stripe billing plugin is not started")
        return self._client

    # -- Billing ------------------------------------------------------------------------------

    async def send(self, event: MeterEvent) -> Delivery:
        """Deliver one meter event under its idempotency key (by default its identifier)."""
        key = event.idempotency_key or event.identifier
        client = self.client
        params: Any = {
            "event_name": event.event_name,
            "identifier": event.identifier,
            "timestamp": event.timestamp,
            "payload": {CUSTOMER_KEY: event.customer, VALUE_KEY: str(event.value)},
        }
        result, failure = await self._attempts(
            lambda: client.v1.billing.meter_events.create_async(
                params=params,
                options={"idempotency_key": key},
            ),
            what="meter_event",
            identifier=event.identifier,
        )
        if failure is None:
            response = getattr(result, "last_response", None)
            replayed = response is not None and (
                (_header(response.headers, "idempotent-replayed") or "").lower() == "true"
            )
            return Delivery(
                Outcome.ACCEPTED,
                provider_id=_request_id(result, event.identifier),
                replayed=replayed,
            )
        return _delivery(failure)

    async def cancel(self, event_name: str, identifier: str) -> Delivery:
        """Cancel a meter event Stripe received less than 24 hours ago."""
        client = self.client
        params: Any = {
            "event_name": event_name,
            "type": "cancel",
            "cancel": {"identifier": identifier},
        }
        result, failure = await self._attempts(
            lambda: client.v1.billing.meter_event_adjustments.create_async(
                params=params, options={"idempotency_key": f"cancel:{identifier}"}
            ),
            what="cancel",
            identifier=identifier,
        )
        if failure is None:
            return Delivery(Outcome.ACCEPTED, provider_id=_request_id(result, identifier))
        return _delivery(failure)

    # -- MeterSummaries ------------------------------------------------------------------------

    async def hourly_usage(
        self, customer: str, event_name: str, start: int, end: int
    ) -> dict[int, int]:
        """Stripe's meter event summaries with ``value_grouping_window=hour``, every page. A
        customer Stripe does not know (``resource_missing`` on `customer`) holds nothing."""
        out: dict[int, int] = {}
        try:
            summaries = await self._summaries(customer, event_name, start, end, "hour")
        except BillingError as exc:
            cause = exc.__cause__
            if (
                isinstance(cause, stripe.InvalidRequestError)
                and cause.code == "resource_missing"
                and cause.param == "customer"
            ):
                return {}
            raise
        for hour, value in summaries:
            if value:
                out[hour] = value
        return out

    # -- InvoicePreviewer ----------------------------------------------------------------------

    async def preview_invoice(self, customer: str, subscription: str) -> InvoicePreview:
        """``invoices.create_preview`` of the subscription's current period."""
        params: Any = {"customer": customer, "subscription": subscription}
        invoice = await stripe_call(
            "invoice preview", self.client.v1.invoices.create_preview_async(params=params)
        )
        lines: list[PreviewLine] = []
        for line in invoice.lines.data:
            details = line.pricing.price_details if line.pricing else None
            lines.append(
                PreviewLine(
                    price=str(details.price) if details and details.price else "",
                    quantity=int(line.quantity or 0),
                    amount=int(line.amount),
                    credit=sum(int(c.amount) for c in line.pretax_credit_amounts or ()),
                )
            )
        return InvoicePreview(
            currency=str(invoice.currency),
            period_start=int(invoice.period_start),
            period_end=int(invoice.period_end),
            subtotal=int(invoice.subtotal),
            total=int(invoice.total),
            lines=lines,
        )

    # -- CatalogPublisher -----------------------------------------------------------------------

    async def publish_catalog(
        self,
        store: CatalogStore,
        catalog: CatalogConfig,
        meters: Sequence[MeterConfig],
        *,
        actor: str,
        dry_run: bool,
        now: Callable[[], int],
    ) -> PublishResult:
        """Make Stripe match `[catalog]` (see :mod:`.catalog`)."""
        return await _publish(
            self.client, store, catalog, meters, actor=actor, dry_run=dry_run, now=now
        )

    # -- CreditNotes ----------------------------------------------------------------------------

    async def credit_usage(
        self, invoice: str, lines: Mapping[str, int], *, memo: str, key: str
    ) -> CreditNoted:
        """One credit note for `lines` units of the invoice's metered lines (see
        :mod:`.credit_notes`)."""
        meter_ids = {name: await self._meter_id(name) for name in lines}
        return await _credit_usage(self.client, meter_ids, invoice, lines, memo=memo, key=key)

    # -- meter totals (the parity checks) -------------------------------------------------------

    async def meter_totals(self, customer: str, event_name: str, start: int, end: int) -> int:
        """What Stripe has aggregated for `customer` on the meter of `event_name` over
        [start, end) (minute-aligned unix seconds). Stripe's summaries are eventually
        consistent: a very recent event may not be counted yet.

        Raises BillingError when Stripe cannot answer or has no such meter.
        """
        return sum(v for _, v in await self._summaries(customer, event_name, start, end, None))

    async def _summaries(
        self, customer: str, event_name: str, start: int, end: int, window: str | None
    ) -> list[tuple[int, int]]:
        """(start time, whole units) of every summary Stripe has for the window, every page.
        ``aggregated_value`` is a JSON number, read through its shortest decimal form (exact
        for whole values below 2**53); a fractional one is an error, as meter event values are
        whole."""
        meter_id = await self._meter_id(event_name)
        client = self.client
        params: Any = {"customer": customer, "start_time": start, "end_time": end, "limit": 100}
        if window is not None:
            params["value_grouping_window"] = window
        page, failure = await self._attempts(
            lambda: client.v1.billing.meters.event_summaries.list_async(meter_id, params=params),
            what="event_summaries",
            identifier=None,
        )
        if failure is not None:
            raise BillingError(
                f"Stripe meter event summaries: {failure.message}"
            ) from failure.error
        assert page is not None
        out: list[tuple[int, int]] = []
        async for summary in page.auto_paging_iter():
            value = Decimal(str(summary.aggregated_value))
            if value != value.to_integral_value():
                raise BillingError(f"Stripe reported a fractional total {value} for {event_name}")
            out.append((int(summary.start_time), int(value)))
        return out

    # -- internals ------------------------------------------------------------------------------

    async def _meter_id(self, event_name: str) -> str:
        if event_name not in self._meter_ids:
            async with self._meters_read:
                if event_name not in self._meter_ids:
                    await self._read_meters()
        try:
            return self._meter_ids[event_name]
        except KeyError:
            raise BillingError(f"Stripe has no meter with event_name {event_name!r}") from None

    async def _read_meters(self) -> None:
        client = self.client
        page, failure = await self._attempts(
            lambda: client.v1.billing.meters.list_async(params={"limit": 100}),
            what="meters",
            identifier=None,
        )
        if failure is not None:
            raise BillingError(f"Stripe meters: {failure.message}") from failure.error
        assert page is not None
        async for meter in page.auto_paging_iter():
            self._meter_ids.setdefault(meter.event_name, meter.id)

    async def _attempts(
        self, call: Callable[[], Awaitable[T]], *, what: str, identifier: str | None
    ) -> tuple[T, None] | tuple[None, _Failure]:
        """Call until a definite answer or the retries run out; same idempotency key each time."""
        ambiguous = False
        attempt = 0
        while True:
            try:
                return await call(), None
            except stripe.StripeError as exc:
                failure = self._classify(exc)
                if exc.http_status == 429:
                    self.throttled += 1
            ambiguous = ambiguous or failure.ambiguous
            if not failure.retryable or attempt >= self.config.max_retries:
                break
            delay = self._delay(attempt + 1, failure.retry_after)
            if delay is None:
                break
            attempt += 1
            log.info(
                "stripe.retrying",
                call=what,
                identifier=identifier,
                attempt=attempt,
                delay=round(delay, 3),
                error=failure.message,
            )
            await self._sleep(delay)
        if ambiguous and failure.outcome is Outcome.RETRY:
            failure = dataclasses.replace(
                failure,
                outcome=Outcome.AMBIGUOUS,
                message="an earlier attempt got no complete answer and may have been applied; "
                f"last answer: {failure.message}",
            )
        return None, failure

    def _delay(self, retry: int, retry_after: float | None) -> float | None:
        """Full-jitter exponential backoff; None when Stripe asks for a longer wait than the
        cap (the sender then tries again on a later pass)."""
        ceiling = min(
            self.config.backoff_cap_seconds, self.config.backoff_base_seconds * 2 ** (retry - 1)
        )
        delay = self._rng.uniform(0, ceiling)
        if retry_after is not None:
            if retry_after > self.config.backoff_cap_seconds:
                return None
            delay = max(delay, retry_after)
        return delay

    def _classify(self, exc: stripe.StripeError) -> _Failure:
        message = self._scrub(exc.user_message or type(exc).__name__)
        status = exc.http_status
        headers = exc.headers or {}
        if isinstance(exc, stripe.APIConnectionError):
            return _Failure(
                Outcome.AMBIGUOUS,
                f"no complete answer from Stripe (the call may have been applied): {message}",
                retryable=True,
                ambiguous=True,
                error=exc,
            )
        if isinstance(exc, stripe.RateLimitError):
            return _Failure(
                Outcome.RETRY,
                message,
                retryable=True,
                retry_after=_retry_after(headers),
                error=exc,
            )
        if isinstance(exc, stripe.IdempotencyError):
            # Stripe compares a key's parameters with those of the first request it saved, and
            # saves only once that request began: it may have been applied. Never REJECTED.
            return _Failure(
                Outcome.AMBIGUOUS,
                "Stripe has this idempotency key from an earlier request with other parameters, "
                f"which may have been applied: {message}",
                retryable=False,
                ambiguous=True,
                error=exc,
            )
        if isinstance(exc, stripe.InvalidRequestError):
            if message.startswith(DUPLICATE_MESSAGE):
                return _Failure(Outcome.DUPLICATE, message, retryable=False, error=exc)
            return _Failure(Outcome.REJECTED, message, retryable=False, error=exc)
        if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
            return _Failure(
                Outcome.RETRY,
                f"Stripe refused the API key (fix billing.api_key): {message}",
                retryable=False,
                error=exc,
            )
        if status is None or status >= 500 or status == 409:
            if (_header(headers, "idempotent-replayed") or "").lower() == "true":
                return _Failure(
                    Outcome.AMBIGUOUS,
                    "Stripe replayed a saved error for this idempotency key: the call had begun "
                    f"and may have been applied: {message}",
                    retryable=False,
                    ambiguous=True,
                    error=exc,
                )
            return _Failure(
                Outcome.RETRY,
                message,
                retryable=(_header(headers, "stripe-should-retry") or "").lower() != "false",
                retry_after=_retry_after(headers),
                error=exc,
            )
        return _Failure(Outcome.REJECTED, message, retryable=False, error=exc)

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "<api key>") if self._api_key else text


def _delivery(failure: _Failure) -> Delivery:
    retry_after = failure.retry_after if failure.outcome is Outcome.RETRY else None
    return Delivery(failure.outcome, message=failure.message, retry_after=retry_after)


def _header(headers: Any, name: str) -> str | None:
    """A response header, whatever the case of its name (the SDK passes httpx's headers)."""
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                value = candidate
                break
    return None if value is None else str(value).strip()


def _retry_after(headers: Any) -> float | None:
    value = _header(headers, "retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: Stripe sends seconds, so do not guess
    return max(0.0, seconds)


def _request_id(result: Any, fallback: str) -> str:
    """Stripe's id for the request that did the write (the original one when replayed)."""
    response = getattr(result, "last_response", None)
    if response is None:
        return fallback
    return _header(response.headers, "original-request") or response.request_id or fallback


spec = PluginSpec(kind="billing", name="stripe", config=StripeBillingConfig, factory=StripeBilling)

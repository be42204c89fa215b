"""The emulated account's state, its clock and its faults.

:class:`EmulatorState` holds every object, memory window and counter; the resource mixins
(``customers``, ``meters``, ``catalog``, ``subscriptions``, ``invoices``, ``credit_grants``,
``checkout``, ``webhooks``) add their endpoints over it and
:class:`~stripe_emulator.app.StripeEmulator` composes them. The clock is real time plus an
offset tests advance; what falls due on the way (period ends, automatic finalizations, session
expiries) happens then, or on a timer on the serving loop.

Faults, set at construction or at run time (:meth:`StripeEmulator.set_faults`,
``POST /_emulator/faults``), drawn from one seedable ``random.Random``:

- ``rate_limit``: requests per second across all callers, a token bucket holding one second's
  worth (Stripe's limiters are token buckets); beyond it 429 ``rate_limit`` with
  ``Retry-After: 1`` and nothing applied.
- ``fail_rate`` / ``fail_next``: fraction of POSTs (or the next N POSTs) answered 500
  ``api_error`` with nothing applied.
- ``fail_after_write_rate``: fraction of new meter events that are applied and then answered 500
  (saved under the idempotency key, as Stripe does).
- ``drop_rate`` / ``drop_next``: fraction of successful meter-event responses (or the next N),
  fresh or replayed, whose connection is cut after the headers: the client sees a connection
  error although a fresh write was applied.
- ``latency_ms``: sleep before processing each ``/v1`` request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import string
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stripe_emulator.errors import Json, no_such
from stripe_emulator.params import ApiRequest
from stripe_emulator.records import (
    DAY,
    AcceptedEvent,
    Counters,
    EmulatedMeter,
    EventDelivery,
    SavedResponse,
    SubscriptionState,
)

IDENTIFIER_MEMORY_SECONDS = DAY
IDEMPOTENCY_KEY_SECONDS = DAY
DEFAULT_INVOICE_FINALIZE_DELAY = 3600.0  # Stripe waits an hour after invoice.created
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclasses.dataclass(slots=True)
class Faults:
    """Injected faults; see the module docstring for what each one does."""

    rate_limit: float | None = None
    fail_rate: float = 0.0
    drop_rate: float = 0.0
    latency_ms: float = 0.0
    fail_after_write_rate: float = 0.0
    fail_next: int = 0
    drop_next: int = 0

    def check(self) -> None:
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ValueError("rate_limit must be positive (or null for none)")
        for name in ("fail_rate", "drop_rate", "fail_after_write_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.latency_ms < 0 or self.fail_next < 0 or self.drop_next < 0:
            raise ValueError("latency_ms, fail_next and drop_next must not be negative")


@dataclasses.dataclass(slots=True)
class WebhookSettings:
    """Webhook delivery; the ``webhooks`` module docstring says what each setting does."""

    max_attempts: int = 4
    retry_base: float = 0.05  # seconds (real time) before the first retry, doubling each time
    retry_max: float = 2.0
    timeout: float = 5.0
    duplicate_rate: float = 0.0
    duplicate_next: int = 0
    hold: bool = False

    def check(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.retry_base < 0 or self.retry_max < 0 or not self.timeout > 0:
            raise ValueError("retry_base and retry_max must not be negative, timeout positive")
        if not 0.0 <= self.duplicate_rate <= 1.0:
            raise ValueError("duplicate_rate must be between 0 and 1")
        if self.duplicate_next < 0:
            raise ValueError("duplicate_next must not be negative")


ASYNC_RULES = (
    "no_meter",
    "archived_meter",
    "meter_event_no_customer_defined",
    "meter_event_customer_not_found",
)


@dataclasses.dataclass(slots=True)
class MeterValidation:
    """Which meter-event checks answer 400 (``sync``) and which are reported later in thin
    events (``async``, the default: no Stripe source says these are synchronous), the error
    report's window and sample size, and the lag of meter event summaries; see the
    ``thin_events`` module docstring."""

    no_meter: str = "async"
    archived_meter: str = "async"
    meter_event_no_customer_defined: str = "async"
    meter_event_customer_not_found: str = "async"
    report_window_seconds: int = 60
    sample_size: int = 3
    summary_lag_seconds: float = 0.0

    def check(self) -> None:
        for rule in ASYNC_RULES:
            if getattr(self, rule) not in ("sync", "async"):
                raise ValueError(f"{rule} must be sync or async")
        if self.report_window_seconds < 1 or self.sample_size < 1:
            raise ValueError("report_window_seconds and sample_size must be at least 1")
        if self.summary_lag_seconds < 0:
            raise ValueError("summary_lag_seconds must not be negative")

    def is_async(self, rule: str) -> bool:
        return bool(getattr(self, rule) == "async")


class EmulatorState:
    """The emulated Stripe account: its objects, its memory windows, its clock and its faults.

    A method that one resource calls on another is declared at the end (``TYPE_CHECKING``);
    the resource mixins define them.
    """

    def __init__(
        self,
        *,
        rate_limit: float | None = None,
        fail_rate: float = 0.0,
        drop_rate: float = 0.0,
        latency_ms: float = 0.0,
        fail_after_write_rate: float = 0.0,
        seed: int | None = None,
        log_events: bool = False,
        clock: Callable[[], float] = time.time,
        webhooks: WebhookSettings | None = None,
        invoice_finalize_delay: float | None = DEFAULT_INVOICE_FINALIZE_DELAY,
        meter_validation: MeterValidation | None = None,
    ) -> None:
        self._initial_validation = dataclasses.replace(meter_validation or MeterValidation())
        self._initial_validation.check()
        self._initial_webhooks = dataclasses.replace(webhooks or WebhookSettings())
        self._initial_webhooks.check()
        if invoice_finalize_delay is not None and invoice_finalize_delay < 0:
            raise ValueError("invoice_finalize_delay must not be negative (or None: never)")
        self._initial_finalize_delay = invoice_finalize_delay
        # webhook delivery runs on the event loop serving the app (see _kick)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._due_timer: asyncio.TimerHandle | None = None
        self._sending = 0  # attempts in flight (kept across reset: they still finish)
        self._initial_faults = Faults(
            rate_limit=rate_limit,
            fail_rate=fail_rate,
            drop_rate=drop_rate,
            latency_ms=latency_ms,
            fail_after_write_rate=fail_after_write_rate,
        )
        self._initial_faults.check()
        self._seed = seed
        self._clock = clock
        self.log_events = log_events
        self.base_url: str | None = None  # set while served by serve_emulator*
        self.reset()

    def reset(self) -> None:
        """Forget every object, counter and memory; restore the construction-time faults."""
        self.faults = dataclasses.replace(self._initial_faults)
        self._rng = random.Random(self._seed)
        self._ids = random.Random(None if self._seed is None else self._seed + 1)
        self._offset = 0.0
        self.customers: dict[str, Json] = {}
        self.meters: dict[str, EmulatedMeter] = {}
        self._meters_by_event: dict[str, EmulatedMeter] = {}
        self.events: dict[tuple[str, str], list[AcceptedEvent]] = {}  # (meter id, customer)
        self._identifiers: dict[str, AcceptedEvent] = {}  # remembered ones, oldest first
        self._idempotency: dict[str, SavedResponse] = {}  # oldest first
        self._acceptances: dict[str, int] = {}  # identifier -> times accepted, ever
        self._last_accepted: dict[str, float] = {}  # identifier -> emulator time
        self._in_flight: set[tuple[str, str]] = set()
        self.counters = Counters()
        self._tokens = self.faults.rate_limit or 0.0
        self._tokens_at = time.monotonic()
        self._window: deque[float] = deque()
        self._max_per_second = 0
        # billing objects
        self.invoice_finalize_delay = self._initial_finalize_delay
        self.products: dict[str, Json] = {}
        self.prices: dict[str, Json] = {}
        self._lookup_keys: dict[str, str] = {}  # lookup key -> price id
        self.subscriptions: dict[str, SubscriptionState] = {}
        self.invoices: dict[str, Json] = {}
        self._auto_finalize: dict[str, int] = {}  # draft invoice id -> when it finalizes
        self.credit_grants: dict[str, Json] = {}
        self.credit_notes: dict[str, Json] = {}
        self._credited_lines: dict[str, list[Any]] = {}  # line id -> [way, quantity, amount]
        self._credit_note_sequence: dict[str, int] = {}  # invoice id -> credit notes so far
        self._grant_balance: dict[str, int] = {}  # credit grant id -> what is left of it
        self.checkout_sessions: dict[str, Json] = {}
        self._setup_data: dict[str, Json] = {}  # session id -> its setup_intent_data
        self.setup_intents: dict[str, Json] = {}
        self._due_at = math.inf  # the next period end, auto-finalization or session expiry
        # events and webhooks
        self.webhook_settings = dataclasses.replace(self._initial_webhooks)
        self._webhook_rng = random.Random(None if self._seed is None else self._seed + 2)
        self.webhook_endpoints: dict[str, Json] = {}  # without their secrets
        self._endpoint_secrets: dict[str, str] = {}
        self.stripe_events: dict[str, Json] = {}  # oldest first
        self._undelivered: dict[str, set[str]] = {}  # event id -> endpoints not yet answering 2xx
        self.deliveries: list[Json] = []  # every delivery attempt, in order
        self._outbox: list[tuple[float, int, EventDelivery]] = []  # heap by due time (monotonic)
        self._held: list[EventDelivery] = []
        self._sequence = 0
        # thin events: destinations, v2 events, error reports being collected
        self.meter_validation = dataclasses.replace(self._initial_validation)
        self.event_destinations: dict[str, Json] = {}
        self.v2_events: dict[str, Json] = {}
        self._v2_created: dict[str, float] = {}
        self._error_windows: dict[tuple[str | None, int], Any] = {}  # thin_events.ErrorWindow

    def now(self) -> float:
        """The emulator clock: real time plus the offset tests advance."""
        return self._clock() + self._offset

    def advance(self, seconds: float) -> float:
        """Move the emulator clock forward; returns the new time.

        As with a Stripe test clock, what falls due on the way happens: subscription periods
        that end are closed (one draft invoice each), drafts whose ``automatically_finalizes_at``
        passes are finalized and open Checkout Sessions past ``expires_at`` expire.
        """
        if seconds < 0:
            raise ValueError("the emulator clock only moves forward")
        target = self._offset + seconds
        # Step to each due time on the way, so what happens is stamped when it falls due and
        # in order (a renewal, its finalization an hour later, the payment retries...).
        while self._due_at - self._clock() <= target:
            due = self._due_at
            self._offset = max(self._offset, due - self._clock())
            self._run_due()
            if self._due_at <= due:  # pragma: no cover - nothing moved: do not spin
                break
        self._offset = target
        self._run_due()
        return self.now()

    def set_faults(self, **changes: Any) -> Faults:
        """Change some faults (the fields of :class:`Faults`); returns the new settings."""
        known = {f.name for f in dataclasses.fields(Faults)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}; known: {sorted(known)}")
        faults = dataclasses.replace(self.faults, **changes)
        if faults.rate_limit == 0:
            faults.rate_limit = None
        faults.check()
        if faults.rate_limit != self.faults.rate_limit:
            self._tokens = faults.rate_limit or 0.0
            self._tokens_at = time.monotonic()
        self.faults = faults
        return faults

    def state(self, *, identifiers: bool = False) -> Json:
        """Counters for assertions (``GET /_emulator/state``).

        ``accepted_again_within_memory`` counts identifiers accepted twice inside their 24 h
        window (always 0: that is Stripe's guarantee); ``identifiers_accepted_more_than_once``
        counts those accepted again after being forgotten (double counting at the provider).
        """
        reaccepted = {k: n for k, n in self._acceptances.items() if n > 1}
        state: Json = dataclasses.asdict(self.counters)
        state.update(
            now=self.now(),
            clock_offset=self._offset,
            customers=len(self.customers),
            meters=len(self.meters),
            max_requests_per_second=self._max_per_second,
            identifiers_remembered=len(self._identifiers),
            identifiers_accepted_more_than_once=len(reaccepted),
            reaccepted_identifiers=reaccepted,
            faults=dataclasses.asdict(self.faults),
            products=len(self.products),
            prices=len(self.prices),
            subscriptions=len(self.subscriptions),
            invoices=len(self.invoices),
            credit_grants=len(self.credit_grants),
            checkout_sessions=len(self.checkout_sessions),
            stripe_events=len(self.stripe_events),
            webhook_endpoints=len(self.webhook_endpoints),
            event_destinations=len(self.event_destinations),
            v2_events=len(self.v2_events),
            meter_validation=dataclasses.asdict(self.meter_validation),
            webhooks_pending=len(self._outbox) + self._sending,
            webhooks_held=len(self._held),
            webhooks=dataclasses.asdict(self.webhook_settings),
            invoice_finalize_delay=self.invoice_finalize_delay,
        )
        if identifiers:
            state["accepted_by_identifier"] = dict(self._acceptances)
        return state

    def meter_total(self, meter: str, customer: str, start: int, end: int) -> int:
        """Aggregated value of `customer`'s non-cancelled events in [start, end) (meter id or
        event name), by the meter's formula."""
        found = self.meters.get(meter) or self._meters_by_event.get(meter)
        if found is None:
            raise KeyError(meter)
        return self._aggregate(found, customer, start, end)

    # -- the clock: what falls due ------------------------------------------------------

    def catch_up(self) -> None:
        """Let what fell due by now happen (period ends, finalizations, session expiries)."""
        if self._due_at <= self.now():
            self._run_due()

    @property
    def clock_offset(self) -> float:
        """Seconds the clock was advanced by."""
        return self._offset

    @property
    def webhooks_pending(self) -> int:
        """Deliveries queued, waiting to retry or in flight (held ones aside)."""
        return len(self._outbox) + self._sending

    @property
    def webhooks_held(self) -> int:
        return len(self._held)

    def _run_due(self) -> None:
        now = self.now()
        if now < self._due_at:
            return
        for state in list(self.subscriptions.values()):
            while state.cycling and state.bounds()[1] <= now:
                self._close_period(state)
        for invoice_id, when in sorted(self._auto_finalize.items(), key=lambda kv: kv[1]):
            if when <= now and self.invoices[invoice_id]["status"] == "draft":
                self.finalize_invoice(invoice_id)
        for session in list(self.checkout_sessions.values()):
            if session["status"] == "open" and session["expires_at"] <= now:
                self._expire_session(session)
        self._run_collection(now)
        self._emit_reports(now)
        self._reschedule()

    def _reschedule(self) -> None:
        """Note when something next falls due, and wake up then (a timer on the loop)."""
        due = min(
            (
                *(s.bounds()[1] for s in self.subscriptions.values() if s.cycling),
                *self._auto_finalize.values(),
                *self._collection_due(),
                *(
                    s["expires_at"]
                    for s in self.checkout_sessions.values()
                    if s["status"] == "open"
                ),
                self._reports_due_at(),
            ),
            default=math.inf,
        )
        self._due_at = due
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None
        if due == math.inf or self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._loop:
            wait = min(max(0.0, due - self.now()), float(DAY))
            self._due_timer = running.call_later(wait, self._on_timer)

    def _on_timer(self) -> None:
        self._due_timer = None
        if self._due_at <= self.now():
            self._run_due()
        else:
            self._reschedule()  # woke early (a capped wait, or a clock that is not real time)

    # -- lookups ----------------------------------------------------------------------

    def _meter(self, ident: str) -> EmulatedMeter:
        meter = self.meters.get(ident)
        if meter is None:
            raise no_such("billing meter", ident, "id", status=404)
        return meter

    def _product(self, ident: str) -> Json:
        product = self.products.get(ident)
        if product is None:
            raise no_such("product", ident, "id", status=404)
        return product

    def _price(self, ident: str) -> Json:
        price = self.prices.get(ident)
        if price is None:
            raise no_such("price", ident, "price", status=404)
        return price

    def _subscription(self, ident: str) -> SubscriptionState:
        state = self.subscriptions.get(ident)
        if state is None:
            raise no_such("subscription", ident, "id", status=404)
        return state

    def _invoice(self, ident: str) -> Json:
        invoice = self.invoices.get(ident)
        if invoice is None:
            raise no_such("invoice", ident, "invoice", status=404)
        return invoice

    def _credit_grant(self, ident: str) -> Json:
        grant = self.credit_grants.get(ident)
        if grant is None:
            raise no_such("credit grant", ident, "id", status=404)
        return grant

    def _checkout_session(self, ident: str) -> Json:
        session = self.checkout_sessions.get(ident)
        if session is None:
            raise no_such("checkout.session", ident, "session", status=404)
        return session

    def _webhook_endpoint(self, ident: str) -> Json:
        endpoint = self.webhook_endpoints.get(ident)
        if endpoint is None:
            raise no_such("webhook endpoint", ident, "id", status=404)
        return endpoint

    def _aggregate(
        self,
        meter: EmulatedMeter,
        customer: str,
        start: int,
        end: int,
        received_by: float = math.inf,
    ) -> int:
        """By the meter's formula, over the non-cancelled events with timestamp in [start,
        end) received by `received_by` (emulator time: what summaries have processed)."""
        events = [
            e
            for e in self.events.get((meter.id, customer), ())
            if not e.cancelled and start <= e.timestamp < end and e.received_at <= received_by
        ]
        if meter.formula == "count":
            return len(events)
        if meter.formula == "last":
            return max(events, key=lambda e: (e.timestamp, e.received_at)).value if events else 0
        return sum(e.value for e in events)

    # -- memory windows, the rate limit, fault draws, ids -------------------------------

    def _forget_expired(self) -> None:
        """Drop identifiers and idempotency keys older than Stripe remembers them."""
        now = self.now()
        identifiers = self._identifiers
        while identifiers:
            oldest = next(iter(identifiers))
            if now - identifiers[oldest].received_at < IDENTIFIER_MEMORY_SECONDS:
                break
            del identifiers[oldest]
        keys = self._idempotency
        while keys:
            oldest = next(iter(keys))
            if now - keys[oldest].saved_at < IDEMPOTENCY_KEY_SECONDS:
                break
            del keys[oldest]

    def _take_token(self) -> bool:
        rate = self.faults.rate_limit
        if rate is None:
            return True
        now = time.monotonic()
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _note_request(self, now: float) -> None:
        window = self._window
        window.append(now)
        while window[0] <= now - 1.0:
            window.popleft()
        if len(window) > self._max_per_second:
            self._max_per_second = len(window)

    def _draw_drop(self) -> bool:
        if self.faults.drop_next:
            self.faults.drop_next -= 1
            return True
        return bool(self.faults.drop_rate) and self._rng.random() < self.faults.drop_rate

    def _random_chars(self, n: int) -> str:
        return "".join(self._ids.choices(_ID_ALPHABET, k=n))

    def _new_id(self, prefix: str, n: int) -> str:
        return f"{prefix}_{self._random_chars(n)}"

    # -- provided by the resource mixins --------------------------------------------------

    if TYPE_CHECKING:

        def add_customer(self, id: str | None = None, **fields: Any) -> Json: ...

        def _emit(
            self,
            event_type: str,
            obj: Json,
            request: ApiRequest | None = None,
            *,
            previous: Json | None = None,
        ) -> Json: ...

        def _update(
            self, obj: Json, changes: Json, event_type: str, request: ApiRequest | None
        ) -> Json: ...

        def _close_period(
            self,
            state: SubscriptionState,
            *,
            end: int | None = None,
            final: bool = False,
            request: ApiRequest | None = None,
        ) -> Json: ...

        def finalize_invoice(
            self, invoice_id: str, request: ApiRequest | None = None, *, collect: bool = True
        ) -> Json: ...

        def _refresh_usage(self, invoice: Json) -> None: ...

        _incomplete_until: dict[str, int]

        def payment_method_for(self, ref: str, param: str) -> Json: ...

        def attach(self, pm: Json, customer: str, request: ApiRequest | None = None) -> Json: ...

        def customer_payment_method(self, ref: str, customer: str, param: str) -> str: ...

        def charge_decline(self, pm_id: str | None) -> tuple[str, str] | None: ...

        def charge_method(self, sub: Json | None, customer_id: str) -> str | None: ...

        def collect(
            self,
            invoice: Json,
            request: ApiRequest | None = None,
            *,
            payment_method: str | None = None,
            automatic: bool = True,
        ) -> tuple[str, str] | None: ...

        def _collection_due(self) -> list[float]: ...

        def _run_collection(self, now: float) -> None: ...

        def _line(self, item: Json, start: int, end: int, quantity: int) -> Json: ...

        def _new_invoice(
            self, sub: Json, start: int, end: int, lines: list[Json], reason: str, created: int
        ) -> Json: ...

        def _apply_credits(self, invoice: Json) -> None: ...

        def _expire_session(self, session: Json, request: ApiRequest | None = None) -> Json: ...

        def _enqueue(self, delivery: EventDelivery, delay: float = 0.0) -> None: ...

        def _emit_reports(self, now: float) -> None: ...

        def _reports_due_at(self) -> float: ...

        def _report_invalid(
            self, meter: str | None, code: str, identifier: str, message: str, now: float
        ) -> None: ...

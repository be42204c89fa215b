"""In-memory billing provider for tests: inspectable, and fails on demand.

It keeps what a provider would (delivered events by identifier) and lets a test script its
answers: ``fail_next(Outcome.RETRY, 3)`` or ``reject_customer("cus_x")``. Like Stripe, a second
event with an identifier it already has is answered DUPLICATE and not counted again; unlike
Stripe it never forgets identifiers.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from controlplane.interfaces import (
    Billing,
    Delivery,
    MeterEvent,
    MeterSummaries,
    Outcome,
    PluginConfig,
)
from controlplane.registry import PluginSpec


class FakeBillingConfig(PluginConfig, tag="fake", tag_field="backend", frozen=True):
    rate_limit: float | None = None


class FakeBilling(Billing, MeterSummaries):
    name = "fake"
    max_event_age_seconds = 35 * 86400

    def __init__(self, config: FakeBillingConfig | None = None) -> None:
        self.config = config or FakeBillingConfig()
        self.reset()

    def reset(self) -> None:
        self.events: dict[str, MeterEvent] = {}
        self.calls: list[MeterEvent] = []
        self.cancelled: set[str] = set()
        self._script: collections.deque[Outcome] = collections.deque()
        self._rejected_customers: set[str] = set()
        self.decide: Callable[[MeterEvent], Outcome | None] | None = None
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    @property
    def rate_limit(self) -> float | None:
        return self.config.rate_limit

    def fail_next(self, outcome: Outcome, times: int = 1) -> None:
        """Answer the next `times` calls with `outcome` (AMBIGUOUS applies the event first)."""
        self._script.extend([outcome] * times)

    def reject_customer(self, customer: str) -> None:
        self._rejected_customers.add(customer)

    async def hourly_usage(
        self, customer: str, event_name: str, start: int, end: int
    ) -> dict[int, int]:
        out: dict[int, int] = collections.Counter()
        for ident, ev in self.events.items():
            if ident in self.cancelled or ev.customer != customer or ev.event_name != event_name:
                continue
            if start <= ev.timestamp < end:
                out[ev.timestamp - ev.timestamp % 3600] += ev.value
        return {hour: units for hour, units in out.items() if units}

    def totals(self) -> dict[tuple[str, str], int]:
        """Delivered, not cancelled, value per (customer, event name)."""
        out: dict[tuple[str, str], int] = collections.Counter()
        for ident, ev in self.events.items():
            if ident not in self.cancelled:
                out[(ev.customer, ev.event_name)] += ev.value
        return dict(out)

    async def send(self, event: MeterEvent) -> Delivery:
        self.calls.append(event)
        outcome = self._script.popleft() if self._script else None
        if outcome is None and self.decide is not None:
            outcome = self.decide(event)
        if outcome is Outcome.RETRY:
            return Delivery(Outcome.RETRY, "injected: try again later")
        if outcome is Outcome.REJECTED or event.customer in self._rejected_customers:
            return Delivery(Outcome.REJECTED, f"No such customer: '{event.customer}'")
        if event.identifier in self.events:
            return Delivery(
                Outcome.DUPLICATE, f"An event already exists with identifier {event.identifier}."
            )
        self.events[event.identifier] = event
        if outcome is Outcome.AMBIGUOUS:
            return Delivery(Outcome.AMBIGUOUS, "injected: connection dropped after the write")
        return Delivery(Outcome.ACCEPTED, provider_id=event.identifier)

    async def cancel(self, event_name: str, identifier: str) -> Delivery:
        if identifier not in self.events or identifier in self.cancelled:
            return Delivery(Outcome.REJECTED, f"no event with identifier {identifier}")
        self.cancelled.add(identifier)
        return Delivery(Outcome.ACCEPTED)


spec = PluginSpec(kind="billing", name="fake", config=FakeBillingConfig, factory=FakeBilling)

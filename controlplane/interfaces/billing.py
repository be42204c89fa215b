"""The billing provider contract: what the sender delivers meter events through."""

from __future__ import annotations

import abc
import enum
from typing import ClassVar

import msgspec


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

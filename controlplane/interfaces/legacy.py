"""The legacy biller contract: what the parity checker and the cutover read of it."""

from __future__ import annotations

import abc
import enum
from decimal import Decimal
from typing import ClassVar

import msgspec

from controlplane.errors import ControlPlaneError


class LegacyError(ControlPlaneError):
    """The legacy biller's source failed."""


class CapabilityUnavailable(LegacyError, NotImplementedError):
    """The legacy plugin cannot answer this question (it is not configured to)."""

    def __init__(self, plugin: str, capability: str, how: str = "") -> None:
        self.capability = capability
        super().__init__(
            f"legacy plugin {plugin!r} cannot tell {capability}" + (f": {how}" if how else "")
        )


class LegacyCapability(enum.StrEnum):
    BILLED_UNTIL = "billed_until"
    PLAN = "plan"
    INVOICES = "invoices"


class LegacyInvoiceLine(msgspec.Struct, frozen=True):
    """One line of a legacy invoice: what it is and its amount in minor units."""

    description: str
    amount_minor: int


class LegacyInvoice(msgspec.Struct, frozen=True):
    """What the legacy biller invoiced one org for a period: the total in minor units and,
    when the source gives them, the lines (None: lines unknown)."""

    org_id: str
    total_minor: int
    lines: list[LegacyInvoiceLine] | None = None


class LegacySource(abc.ABC):
    """The legacy biller, as the control plane reads it: what it billed per org and window.

    `usage` is required. `billed_until`, `plan` and `invoices` are optional capabilities: a
    plugin lists the ones it can answer in :meth:`capabilities`, and the others raise
    :class:`CapabilityUnavailable`, never a made-up answer.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    async def start(self) -> None:
        """Prepare to query; must not fail only because the legacy system is down."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def usage(self, start: int, end: int) -> dict[str, Decimal]:
        """Per org, the exact usage the legacy biller counts for the parity meter in the
        window [start, end) (unix seconds). Orgs without usage may be absent. Raises
        LegacyError when the source fails or answers something that is not exact."""

    def capabilities(self) -> frozenset[LegacyCapability]:
        """The optional questions this plugin, as configured, can answer."""
        return frozenset()

    async def billed_until(self) -> int | None:
        """Unix seconds up to which the legacy biller has billed (None: nothing yet)."""
        raise CapabilityUnavailable(self.name, LegacyCapability.BILLED_UNTIL)

    async def plan(self, org_id: str) -> str | None:
        """The org's plan according to the legacy biller (None: it does not know the org)."""
        raise CapabilityUnavailable(self.name, LegacyCapability.PLAN)

    async def invoices(self, start: int, end: int) -> dict[str, LegacyInvoice]:
        """Per org, what the legacy biller invoiced for the billing period [start, end) (unix
        seconds). Orgs it did not invoice are absent."""
        raise CapabilityUnavailable(self.name, LegacyCapability.INVOICES)

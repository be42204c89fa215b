"""The legacy biller behind a JSON endpoint.

    [legacy]
    backend = "http"
    url = "https://legacy.internal/usage"     # GET {url}?from=START&to=END
    token = { env = "LEGACY_TOKEN" }          # optional, sent as a bearer token

The usage endpoint answers the window [from, to) (unix seconds) as a JSON array of rows, or an
object holding it under `rows`; each row is `[org_id, value]` or `{"org_id": ..., "value": ...}`.
Values are read exactly: JSON numbers are decoded as decimals, never binary floats, and decimal
strings are accepted. Optional: `billed_until_url` answering `{"billed_until": T | null}` and
`plan_url` (with `{org}` in it) answering `{"plan": "..." | null}`, 404 for an unknown org, and
`invoices_url` (GET {invoices_url}?from=START&to=END, the billing period) answering an array of
invoices, or an object holding it under `invoices`: each `{"org_id": ..., "total": N}` with
optional `"lines": [{"description": ..., "amount": N}, ...]`, amounts in whole minor units (cents).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx
import msgspec

from controlplane.config import LegacyPluginConfig
from controlplane.errors import ConfigError
from controlplane.interfaces import (
    CapabilityUnavailable,
    LegacyCapability,
    LegacyError,
    LegacyInvoice,
    LegacyInvoiceLine,
    LegacySource,
)
from controlplane.plugins.legacy._common import collect, minor, org_id, unix_seconds
from controlplane.registry import PluginSpec
from controlplane.secrets import Secret, reveal

_decoder = msgspec.json.Decoder(float_hook=Decimal)


class HTTPLegacyConfig(LegacyPluginConfig, tag="http", tag_field="backend", frozen=True):
    url: str
    token: Secret | None = None
    billed_until_url: str | None = None
    plan_url: str | None = None
    invoices_url: str | None = None
    timeout_seconds: float = 30.0


def rows_of(body: Any) -> list[tuple[Any, Any]]:
    """(org id, value) pairs from the usage endpoint's JSON."""
    if isinstance(body, dict):
        if "rows" not in body:
            raise LegacyError("legacy usage endpoint: expected an array, or an object with `rows`")
        body = body["rows"]
    if not isinstance(body, list):
        raise LegacyError("legacy usage endpoint: `rows` must be an array")
    out: list[tuple[Any, Any]] = []
    for i, row in enumerate(body):
        if isinstance(row, dict) and "org_id" in row and "value" in row:
            out.append((row["org_id"], row["value"]))
        elif isinstance(row, list) and len(row) == 2:
            out.append((row[0], row[1]))
        else:
            raise LegacyError(
                f"legacy usage endpoint row {i}: expected [org_id, value] or "
                f'{{"org_id", "value"}}, got {row!r:.100}'
            )
    return out


class HTTPLegacySource(LegacySource):
    name = "http"

    def __init__(self, config: HTTPLegacyConfig) -> None:
        for key in ("url", "billed_until_url", "plan_url", "invoices_url"):
            value = getattr(config, key)
            if value is not None and not value.startswith(("http://", "https://")):
                raise ConfigError(f"legacy.{key}: expected an http:// or https:// URL")
        if config.plan_url is not None and "{org}" not in config.plan_url:
            raise ConfigError("legacy.plan_url: must contain {org}")
        if config.timeout_seconds <= 0:
            raise ConfigError("legacy.timeout_seconds: must be > 0")
        self.config = config
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        headers = {"Accept": "application/json"}
        if self.config.token is not None:
            headers["Authorization"] = f"Bearer {reveal(self.config.token, 'legacy.token')}"
        self._client = httpx.AsyncClient(headers=headers, timeout=self.config.timeout_seconds)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _get(
        self, url: str, what: str, params: dict[str, Any] | None = None, missing_ok: bool = False
    ) -> Any:
        if self._client is None:
            raise LegacyError("legacy source is not started")
        try:
            response = await self._client.get(url, params=params)
        except httpx.HTTPError as exc:
            raise LegacyError(f"legacy {what} unreachable: {type(exc).__name__}") from exc
        if missing_ok and response.status_code == 404:
            return None
        if response.status_code != 200:
            raise LegacyError(f"legacy {what} answered {response.status_code}")
        try:
            return _decoder.decode(response.content)
        except msgspec.DecodeError as exc:
            raise LegacyError(f"legacy {what}: invalid JSON: {exc}") from exc

    async def usage(self, start: int, end: int) -> dict[str, Decimal]:
        body = await self._get(self.config.url, "usage endpoint", {"from": start, "to": end})
        return collect(rows_of(body), "legacy usage endpoint")

    def capabilities(self) -> frozenset[LegacyCapability]:
        found = set()
        if self.config.billed_until_url:
            found.add(LegacyCapability.BILLED_UNTIL)
        if self.config.plan_url:
            found.add(LegacyCapability.PLAN)
        if self.config.invoices_url:
            found.add(LegacyCapability.INVOICES)
        return frozenset(found)

    async def billed_until(self) -> int | None:
        if not self.config.billed_until_url:
            raise CapabilityUnavailable(
                self.name, LegacyCapability.BILLED_UNTIL, "set legacy.billed_until_url"
            )
        body = await self._get(self.config.billed_until_url, "billed_until endpoint")
        if not isinstance(body, dict) or "billed_until" not in body:
            raise LegacyError('legacy billed_until endpoint: expected {"billed_until": ...}')
        return unix_seconds(body["billed_until"], "legacy billed_until endpoint")

    async def plan(self, org_id: str) -> str | None:
        if not self.config.plan_url:
            raise CapabilityUnavailable(self.name, LegacyCapability.PLAN, "set legacy.plan_url")
        url = self.config.plan_url.replace("{org}", quote(org_id, safe=""))
        body = await self._get(url, "plan endpoint", missing_ok=True)
        if body is None:
            return None
        plan = body.get("plan", 0) if isinstance(body, dict) else 0
        if plan is not None and not isinstance(plan, str):
            raise LegacyError('legacy plan endpoint: expected {"plan": "..." | null}')
        return plan

    async def invoices(self, start: int, end: int) -> dict[str, LegacyInvoice]:
        if not self.config.invoices_url:
            raise CapabilityUnavailable(
                self.name, LegacyCapability.INVOICES, "set legacy.invoices_url"
            )
        body = await self._get(
            self.config.invoices_url, "invoices endpoint", {"from": start, "to": end}
        )
        return invoices_of(body)


def invoices_of(body: Any) -> dict[str, LegacyInvoice]:
    """Legacy invoices from the invoices endpoint's JSON."""
    where = "legacy invoices endpoint"
    if isinstance(body, dict):
        if "invoices" not in body:
            raise LegacyError(f"{where}: expected an array, or an object with `invoices`")
        body = body["invoices"]
    if not isinstance(body, list):
        raise LegacyError(f"{where}: `invoices` must be an array")
    out: dict[str, LegacyInvoice] = {}
    for i, item in enumerate(body):
        if not isinstance(item, dict) or "org_id" not in item or "total" not in item:
            raise LegacyError(f'{where} invoice {i}: expected {{"org_id", "total"}}')
        org = org_id(item["org_id"], f"{where} invoice {i}, org_id")
        if org in out:
            raise LegacyError(f"{where} invoice {i}: a second invoice for org {org!r}")
        total = minor(item["total"], f"{where} invoice {i} ({org}), total")
        lines: list[LegacyInvoiceLine] | None = None
        if item.get("lines") is not None:
            if not isinstance(item["lines"], list):
                raise LegacyError(f"{where} invoice {i} ({org}): `lines` must be an array")
            lines = []
            for j, line in enumerate(item["lines"]):
                at = f"{where} invoice {i} ({org}), line {j}"
                if not isinstance(line, dict) or not isinstance(line.get("description"), str):
                    raise LegacyError(f'{at}: expected {{"description": "...", "amount": N}}')
                lines.append(LegacyInvoiceLine(line["description"], minor(line.get("amount"), at)))
        out[org] = LegacyInvoice(org, total, lines)
    return out


spec = PluginSpec(kind="legacy", name="http", config=HTTPLegacyConfig, factory=HTTPLegacySource)

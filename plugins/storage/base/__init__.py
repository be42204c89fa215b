"""What both SQL storage plugins share: every storage method whose logic does not depend on the
database, written once over a narrow driver contract.

A plugin (`sqlite.py`, `postgres.py`) keeps its dialect and its driver, nothing else:

- its queries, by name, in its `.sql` file: the same names, the same arguments in the same order
  (`$1` in PostgreSQL, `?1` in SQLite), the columns the records are decoded from by name;
- :class:`Connection`: one driver connection running those queries, with the dialect's bulk
  style (`bulk`: one statement per row, or one with each column as an array) and its
  transaction advisory locks (`lock`; a single-writer store needs none);
- :meth:`SQLStorage._tx` and :meth:`SQLStorage._read`: transactions and reads, with the
  driver's retries, and its errors translated into :class:`StorageError` at this boundary;
- :meth:`SQLStorage._array`: a list as one query parameter;
- what really differs: opening and closing, storing a batch of events, taking the rollup's
  batch of dirty buckets (:meth:`SQLStorage._take_dirty`), summing usage per org for parity,
  and the migration session (see :mod:`controlplane.migrations`).

Modules: `driver` (the contract, the lifecycle's shared methods, the audit chain's append),
`ledger` (usage, rollup, ledger reads, sending), `gauges` (gauge meters' series), `state`
(orgs, flags, audit, jobs), `parity` (parity, catalog, webhooks), `errors` (the provider's error
reports), `money` (money parity), `reconcile` (reconciliation runs): one mixin per storage
contract, :class:`SQLStorage` all of them.

Locks are named (:data:`CHAIN_LOCK` ...); every transaction that rewrites a rounding chain holds
:data:`CHAIN_LOCK`, every audited write takes :data:`AUDIT_LOCK` before reading the chain's end.
"""

from __future__ import annotations

from controlplane.interfaces import Storage
from controlplane.plugins.storage.base.driver import (
    AUDIT_LOCK,
    CHAIN_LOCK,
    CLAIM_LOCK,
    FLAGS_LOCK,
    Connection,
    DirtyBatch,
    Row,
    SQLDriver,
)
from controlplane.plugins.storage.base.errors import SQLProviderErrors
from controlplane.plugins.storage.base.gauges import SQLGauges, gauge_touches, point_order
from controlplane.plugins.storage.base.ledger import SQLEvents, SQLLedger, SQLSending
from controlplane.plugins.storage.base.money import SQLMoneyParity
from controlplane.plugins.storage.base.parity import SQLCatalogWebhooks, SQLParity
from controlplane.plugins.storage.base.reconcile import SQLReconcile
from controlplane.plugins.storage.base.state import SQLAudit, SQLFlags, SQLJobs, SQLOrgs


class SQLStorage(
    SQLEvents,
    SQLLedger,
    SQLGauges,
    SQLSending,
    SQLOrgs,
    SQLFlags,
    SQLAudit,
    SQLJobs,
    SQLParity,
    SQLMoneyParity,
    SQLReconcile,
    SQLCatalogWebhooks,
    SQLProviderErrors,
    Storage,
):
    """Every storage method over the driver contract; a plugin adds its dialect and driver."""


__all__ = [
    "AUDIT_LOCK",
    "CHAIN_LOCK",
    "CLAIM_LOCK",
    "FLAGS_LOCK",
    "Connection",
    "DirtyBatch",
    "Row",
    "SQLDriver",
    "SQLStorage",
    "gauge_touches",
    "point_order",
]

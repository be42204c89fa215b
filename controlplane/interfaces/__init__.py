"""Every plugin contract, as abstract base classes: a class that misses a method fails when it is
instantiated, not in production.

Plugins are chosen by name in the config (``backend = "sqlite"``) and resolved through
:mod:`controlplane.registry`. All plugins share one lifecycle: ``await start()`` once before use,
``await close()`` once at shutdown.

- :mod:`.storage`: :class:`Storage`, the composition of the narrow per-domain contracts
  (:class:`EventStore`, :class:`LedgerStore`, :class:`SendStore`, ...);
- :mod:`.ingest`: :class:`IngestSource`;
- :mod:`.billing`: :class:`Billing`;
- :mod:`.legacy`: :class:`LegacySource`;
- :mod:`.records`: the structs they take and return.

Every public name is importable from this package: ``from controlplane.interfaces import X``.
"""

from __future__ import annotations

from controlplane.interfaces.billing import (
    Billing,
    Delivery,
    MeterEvent,
    Outcome,
)
from controlplane.interfaces.ingest import (
    EventSink,
    IngestSource,
)
from controlplane.interfaces.legacy import (
    CapabilityUnavailable,
    LegacyCapability,
    LegacyError,
    LegacySource,
)
from controlplane.interfaces.records import (
    Attempt,
    AuditEntry,
    AuditRecord,
    Carry,
    CatalogVersion,
    ChainRow,
    Claim,
    ClosedPeriod,
    DirtyBacklog,
    FlagGuard,
    FlagsChanged,
    FlagWrite,
    HeldBucket,
    IngestResult,
    JobRun,
    LedgerCount,
    MigrationStatus,
    Org,
    OrgChange,
    OrgDrift,
    ParityAlert,
    ParityRun,
    PlanPeriod,
    PluginConfig,
    RollupBatch,
    RollupPlan,
    RollupPlanner,
    RuntimeFlag,
    SeamReader,
    SeamRows,
    SendItem,
    Settlement,
    StaticFlags,
    StoredEvent,
    UsageTotal,
    WebhookRecord,
)
from controlplane.interfaces.storage import (
    AuditStore,
    CatalogStore,
    EventStore,
    FlagStore,
    JobStore,
    LedgerStore,
    OrgStore,
    ParityStore,
    SendStore,
    Storage,
    StorageLifecycle,
    WebhookStore,
)

__all__ = [
    "Attempt",
    "AuditEntry",
    "AuditRecord",
    "AuditStore",
    "Billing",
    "CapabilityUnavailable",
    "Carry",
    "CatalogStore",
    "CatalogVersion",
    "ChainRow",
    "Claim",
    "ClosedPeriod",
    "Delivery",
    "DirtyBacklog",
    "EventSink",
    "EventStore",
    "FlagGuard",
    "FlagStore",
    "FlagWrite",
    "FlagsChanged",
    "HeldBucket",
    "IngestResult",
    "IngestSource",
    "JobRun",
    "JobStore",
    "LedgerCount",
    "LedgerStore",
    "LegacyCapability",
    "LegacyError",
    "LegacySource",
    "MeterEvent",
    "MigrationStatus",
    "Org",
    "OrgChange",
    "OrgDrift",
    "OrgStore",
    "Outcome",
    "ParityAlert",
    "ParityRun",
    "ParityStore",
    "PlanPeriod",
    "PluginConfig",
    "RollupBatch",
    "RollupPlan",
    "RollupPlanner",
    "RuntimeFlag",
    "SeamReader",
    "SeamRows",
    "SendItem",
    "SendStore",
    "Settlement",
    "StaticFlags",
    "Storage",
    "StorageLifecycle",
    "StoredEvent",
    "UsageTotal",
    "WebhookRecord",
    "WebhookStore",
]

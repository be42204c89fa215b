"""The audit trail: append-only, hash-chained records of every money-moving change.

Each record's hash covers its content and the previous record's hash, so editing or deleting
any record breaks every link after it; :func:`verify` finds the first broken one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import msgspec

from controlplane.interfaces import AuditEntry, AuditRecord

GENESIS = "0" * 64
_encoder = msgspec.json.Encoder(order="sorted")


def record_hash(prev_hash: str, at: int, entry: AuditEntry) -> str:
    """The chained hash of one record."""
    body: dict[str, Any] = {
        "prev": prev_hash,
        "at": at,
        "action": entry.action,
        "subject": entry.subject,
        "actor": entry.actor,
        "reason": entry.reason,
        "before": entry.before,
        "after": entry.after,
        "forced": entry.forced,
        "group_id": entry.group_id,
    }
    return hashlib.sha256(_encoder.encode(body)).hexdigest()


def verify(records: Iterable[AuditRecord]) -> int | None:
    """The id of the first record (oldest first) whose link is broken, or None."""
    prev = GENESIS
    for rec in records:
        entry = AuditEntry(
            action=rec.action,
            subject=rec.subject,
            actor=rec.actor,
            reason=rec.reason,
            before=rec.before,
            after=rec.after,
            forced=rec.forced,
            group_id=rec.group_id,
        )
        if rec.prev_hash != prev or rec.hash != record_hash(prev, rec.at, entry):
            return rec.id
        prev = rec.hash
    return None

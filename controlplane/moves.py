"""The audit records of money moves (DESIGN invariant 6): what the trail says of each ledger
row sent, held for a provider error, cancelled, re-issued, offset or billed again.

Pure functions; the services build the records they know in advance (a row sent), and the
storage plugins call these for what only the moving transaction knows (the state a row left,
the revision it was re-issued as), appending each in that transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from controlplane.interfaces import AuditEntry, Settlement
from controlplane.ledger import Reason, RowState


def sent(settlement: Settlement, actor: str) -> AuditEntry:
    """A row moved to `sent`: who sent it, its quantity, the customer it was sent for and the
    provider's id for it."""
    return AuditEntry(
        action="ledger.sent",
        subject=settlement.identifier,
        actor=actor,
        after={
            "quantity": settlement.quantity,
            "customer": settlement.customer,
            "provider_id": settlement.provider_id,
        },
    )


def audited(settlements: Sequence[Settlement], actor: str) -> list[Settlement]:
    """The decisions with their audit records: every move to `sent` is audited."""
    return [
        msgspec.structs.replace(s, audit=sent(s, actor)) if s.state is RowState.SENT else s
        for s in settlements
    ]


def cancelled(identifier: str, state: str, quantity: int, actor: str, reason: str) -> AuditEntry:
    """A row the provider cancelled (or will never bill), handed back."""
    return AuditEntry(
        action="ledger.cancelled",
        subject=identifier,
        actor=actor,
        reason=reason,
        before={"state": state},
        after={"state": "cancelled", "quantity": quantity},
    )


def reissued(
    identifier: str, state: str, quantity: int, new_identifier: str, actor: str, detail: str
) -> AuditEntry:
    """A row whose usage goes on under its bucket's next revision."""
    return AuditEntry(
        action="ledger.reissued",
        subject=identifier,
        actor=actor,
        reason=detail,
        before={"state": state, "quantity": quantity},
        after={"state": "cancelled", "reissued_as": new_identifier},
    )


def offset_appended(
    identifier: str, offsets_id: int, quantity: int, actor: str, detail: str
) -> AuditEntry:
    """An offsetting row appended (sent by the rollback that appended it)."""
    return AuditEntry(
        action="ledger.offset_appended",
        subject=identifier,
        actor=actor,
        reason=detail,
        after={"offsets_id": offsets_id, "quantity": quantity},
    )


def offset(original: str, offset_identifier: str, offset_quantity: int, actor: str) -> AuditEntry:
    """A row the provider took off by its offset: handed back."""
    return AuditEntry(
        action="ledger.offset",
        subject=original,
        actor=actor,
        reason="handed back to the legacy biller by an offset in its open period",
        before={"state": "sent", "quantity": -offset_quantity},
        after={"state": "cancelled", "reason": Reason.OFFSET.value, "offset_by": offset_identifier},
    )


def offset_undone(offset: str, undo_identifier: str, undo_quantity: int, actor: str) -> AuditEntry:
    """An offset undone by an offset of its own: the row it took off is billed here again."""
    return AuditEntry(
        action="ledger.offset_undone",
        subject=offset,
        actor=actor,
        reason="its bucket stays billed here (another of its rows could not be handed back)",
        before={"state": "sent", "quantity": -undo_quantity},
        after={"state": "cancelled", "reason": Reason.OFFSET.value, "undone_by": undo_identifier},
    )


def provider_error_held(
    identifier: str, before: dict[str, Any], code: str, message: str, actor: str, why: str
) -> AuditEntry:
    """A row the provider reported invalid after taking it: held, never billed there."""
    return AuditEntry(
        action="ledger.held",
        subject=identifier,
        actor=actor,
        reason=why,
        before=before,
        after={
            "state": "held",
            "reason": Reason.PROVIDER_ERROR.value,
            "code": code,
            "message": message,
        },
    )


def customer_flagged(org_id: str, code: str, identifier: str, actor: str, why: str) -> AuditEntry:
    """An org whose provider customer the provider does not know."""
    return AuditEntry(
        action="org.customer_flagged",
        subject=org_id,
        actor=actor,
        reason=why,
        after={"customer_error": code, "identifier": identifier},
    )

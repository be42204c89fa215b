"""The audit records of money moves say what moved, from what, to what."""

from __future__ import annotations

from controlplane import moves
from controlplane.interfaces import Settlement
from controlplane.ledger import RowState


def test_only_moves_to_sent_get_the_senders_record() -> None:
    sent = Settlement(1, "o:m:0:1", RowState.SENT, customer="cus", quantity=7, provider_id="mev")
    held = Settlement(2, "o:m:0:2", RowState.HELD, reason="no_customer")
    audited = moves.audited([sent, held], "sender")
    assert audited[1] == held
    record = audited[0].audit
    assert record is not None and (record.action, record.subject, record.actor) == (
        "ledger.sent",
        "o:m:0:1",
        "sender",
    )
    assert record.after == {"quantity": 7, "customer": "cus", "provider_id": "mev"}


def test_an_offset_and_its_undoing_name_each_other_and_the_units() -> None:
    taken = moves.offset("o:m:0:1", "o:m:0:2", -20, "ops")
    assert (taken.subject, taken.before, taken.after) == (
        "o:m:0:1",
        {"state": "sent", "quantity": 20},
        {"state": "cancelled", "reason": "offset", "offset_by": "o:m:0:2"},
    )
    undone = moves.offset_undone("o:m:0:2", "o:m:0:3", 20, "ops")
    assert (undone.action, undone.subject, undone.after["undone_by"]) == (
        "ledger.offset_undone",
        "o:m:0:2",
        "o:m:0:3",
    )
    reissued = moves.reissued("o:m:0:1", "cancelled", 20, "o:m:0:4", "ops", "bucket stays")
    assert (reissued.before, reissued.after) == (
        {"state": "cancelled", "quantity": 20},
        {"state": "cancelled", "reissued_as": "o:m:0:4"},
    )

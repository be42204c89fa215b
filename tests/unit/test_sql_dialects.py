"""The two storage dialects mean the same: every named block both `.sql` files hold tests the
same states and reasons (which rows a move may take is written in each file; a guard one
dialect lacks let a row another replica moved be overwritten)."""

from __future__ import annotations

import re
from collections import Counter

from controlplane.sql import load

# `state = 'sent'`, `reason IN ('a', 'b')`, `l.state <> 'cancelled'`, `reason IS NULL`...
PREDICATE = re.compile(
    r"\b(?:\w+\.)?(state|reason)\s*(=|<>|IN|IS NOT DISTINCT FROM|IS NOT|IS)\s*"
    r"(\('[^)]*\)|'[^']*'|NULL)",
    re.IGNORECASE,
)
SAME = {"IS NOT DISTINCT FROM": "=", "IS": "=", "IS NOT": "<>"}


def predicates(sql: str) -> Counter[tuple[str, str, str]]:
    return Counter(
        (m[1].lower(), SAME.get(m[2].upper(), m[2].upper()), re.sub(r"\s+", " ", m[3]))
        for m in PREDICATE.finditer(sql)
    )


def test_blocks_of_one_name_test_the_same_states_and_reasons() -> None:
    sqlite = load("controlplane.plugins.storage", "sqlite.sql")
    postgres = load("controlplane.plugins.storage", "postgres.sql")
    shared = sorted(set(sqlite) & set(postgres))
    assert len(shared) > 100
    differing = {
        name: (predicates(sqlite[name]), predicates(postgres[name]))
        for name in shared
        if predicates(sqlite[name]) != predicates(postgres[name])
    }
    assert differing == {}
    assert predicates("WHERE state = 'sent' OR (attempts > 0 AND l.state IN ('pending', 'held'))")

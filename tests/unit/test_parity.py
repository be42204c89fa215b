"""Parity maths, the alert policy's pieces, clean-since and request signatures: pure functions."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane import parity
from controlplane.auth import Unauthorized
from controlplane.interfaces import ParityRun
from controlplane.parity import Policy, Ratio, compare, fmt, relative_micros, within
from controlplane.units import format_micros

H = 3600
T0 = 1_767_225_600
POLICY = Policy.of(Decimal("0.10"), Decimal("100"), 3, 2)
U = 1_000_000  # one unit in micro-units


def cmp(
    cp: dict[str, int], legacy: dict[str, str] | None, tolerance: str = "0.02"
) -> parity.Comparison:
    return compare(
        "m",
        T0,
        T0 + H,
        {k: v * U for k, v in cp.items()},
        None if legacy is None else {k: Decimal(v) for k, v in legacy.items()},
        Decimal(tolerance),
        POLICY,
    )


# exact helpers -------------------------------------------------------------------------------


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_fmt_matches_format_micros(micros: int) -> None:
    assert fmt(micros) == format_micros(micros)


def test_relative_drift_rounds_up_and_is_undefined_over_zero() -> None:
    assert relative_micros(1, 3) == 333_334  # 0.3333.. shown as 0.333334, never less
    assert relative_micros(30, 1000) == 30_000
    assert relative_micros(0, 0) == 0
    assert relative_micros(5, 0) is None


def test_tolerance_boundary_is_exact() -> None:
    two_percent = Ratio.of(Decimal("0.02"))
    assert within(20 * U, 1000 * U, two_percent)  # exactly 2 %: agrees
    assert not within(20 * U + 1, 1000 * U, two_percent)  # one micro-unit more: does not
    assert within(0, 0, two_percent)
    assert not within(1, 0, two_percent)


# comparison ----------------------------------------------------------------------------------


def test_agreeing_orgs_are_clean() -> None:
    c = cmp({"a": 100, "b": 50}, {"a": "100", "b": "49.5"})
    assert c.summary.status == "clean"
    assert c.summary.mismatches == 0
    assert [o.within_tolerance for o in c.orgs] == [True, True]
    b = c.orgs[1]
    assert (b.drift, b.relative) == (500_000, 10_102)  # 0.5 / 49.5 = 0.0101.. rounded up


def test_org_on_one_side_only_is_a_mismatch_even_at_zero() -> None:
    c = cmp({"a": 100, "only-cp": 7}, {"a": "100", "only-legacy": "0"})
    by = {o.org_id: o for o in c.orgs}
    assert by["only-cp"].side == "controlplane" and not by["only-cp"].within_tolerance
    assert by["only-cp"].relative is None  # legacy 0: undefined
    assert by["only-legacy"].side == "legacy" and by["only-legacy"].drift == 0
    assert not by["only-legacy"].within_tolerance
    assert c.summary.status == "mismatch"
    assert (c.summary.mismatches, c.summary.only_controlplane, c.summary.only_legacy) == (2, 1, 1)


def test_three_percent_under_count_is_outside_two_percent() -> None:
    c = cmp({"u": 97}, {"u": "100"})
    (u,) = c.orgs
    assert (u.drift, u.relative, u.within_tolerance) == (-3 * U, 30_000, False)
    api = parity.org_api(u, has_legacy=True)
    assert api["drift"] == "-3" and api["absolute_drift"] == "3"
    assert api["relative_drift"] == "0.03"


def test_worst_prefers_undefined_then_largest_relative() -> None:
    c = cmp({"a": 110, "b": 300, "c": 1}, {"a": "100", "b": "200"})
    assert c.summary.worst is not None and c.summary.worst.org_id == "c"
    c = cmp({"a": 110, "b": 300}, {"a": "100", "b": "200"})
    assert c.summary.worst is not None and c.summary.worst.org_id == "b"
    assert cmp({"a": 1}, {"a": "1"}).summary.worst is None


def test_totals_and_legacy_values_are_exact() -> None:
    c = cmp({"a": 1}, {"a": "1.0000004", "b": "0.1234565"})
    # legacy values are kept to six decimals, half-even
    by = {o.org_id: o for o in c.orgs}
    assert by["a"].legacy == 1_000_000 and by["b"].legacy == 123_456
    assert c.summary.legacy_total == 1_123_456
    assert c.summary.total_drift == -123_456


def test_without_legacy_only_the_control_planes_side_is_served() -> None:
    c = cmp({"b": 2, "a": 1}, None)
    assert c.summary.status == "no_legacy"
    assert [o.org_id for o in c.orgs] == ["a", "b"]
    api = parity.comparison_api(c)
    assert api["orgs"][0] == {
        "org_id": "a",
        "controlplane": "1",
        "legacy": None,
        "side": "controlplane",
        "drift": None,
        "absolute_drift": None,
        "relative_drift": None,
        "within_tolerance": None,
    }
    assert api["summary"]["totals"]["controlplane"] == "3"
    assert api["summary"]["totals"]["legacy"] is None


def test_mismatches_only_lists_the_orgs_that_disagree() -> None:
    c = cmp({"a": 100, "b": 100}, {"a": "100", "b": "50"})
    api = parity.comparison_api(c, mismatches_only=True)
    assert [o["org_id"] for o in api["orgs"]] == ["b"]
    assert api["summary"]["orgs"] == 2


# alert policy --------------------------------------------------------------------------------


def test_material_needs_both_relative_and_absolute() -> None:
    assert POLICY.material(111 * U, 1000 * U)  # 11.1 % and 111 units
    assert not POLICY.material(100 * U, 1000 * U)  # exactly 10 %: not above
    assert not POLICY.material(99 * U, 10 * U)  # 990 % but under 100 units
    assert POLICY.material(100 * U, 0)  # one-sided counts as infinite
    assert not POLICY.material(50 * U, 0)


def test_bucket_is_alarming_on_three_orgs_or_on_the_total() -> None:
    two = cmp({"a": 200, "b": 200, "c": 10_000}, {"a": "0", "b": "0", "c": "10000"})
    assert two.summary.material_orgs == 2
    assert not two.summary.total_material and not two.summary.alarming
    three = cmp({"a": 200, "b": 200, "d": 200, "c": 10_000}, {"c": "10000"})
    assert three.summary.material_orgs == 3 and three.summary.alarming
    total = cmp({"a": 1_000, "b": 1_050}, {"a": "1000", "b": "900"})
    assert total.summary.material_orgs == 1
    assert not total.summary.total_material  # 150 over 1900 is 7.9 %
    total = cmp({"a": 1_000, "b": 1_250}, {"a": "1000", "b": "1000"})
    assert total.summary.material_orgs == 1 and total.summary.total_material
    assert total.summary.alarming


def _run(start: int, alarming: bool, previous: ParityRun | None) -> ParityRun:
    legacy = {"a": "100"} if alarming else {"a": "1000"}
    c = compare(
        "m", start, start + H, {"a": 1000 * U}, {"a": Decimal(legacy["a"])}, Decimal(0), POLICY
    )
    assert c.summary.alarming == alarming
    return parity.to_run(c, start + 2 * H, previous)


def test_alert_after_consecutive_alarming_buckets_only() -> None:
    first = _run(T0, True, None)
    assert first.alarm_since == T0 and not parity.should_alert(first, H, 2)
    second = _run(T0 + H, True, first)
    assert second.alarm_since == T0 and parity.should_alert(second, H, 2)
    assert parity.dedup_key(second) == f"parity:m:{T0}"
    third = _run(T0 + 2 * H, True, second)
    assert parity.dedup_key(third) == parity.dedup_key(second)  # same incident
    calm = _run(T0 + 3 * H, False, third)
    assert calm.alarm_since is None and not parity.should_alert(calm, H, 2)
    again = _run(T0 + 4 * H, True, calm)
    assert again.alarm_since == T0 + 4 * H and not parity.should_alert(again, H, 2)


def test_a_gap_breaks_the_alarming_streak() -> None:
    first = _run(T0, True, None)
    after_gap = _run(T0 + 2 * H, True, first)
    assert after_gap.alarm_since == T0 + 2 * H
    assert not parity.should_alert(after_gap, H, 2)
    assert parity.should_alert(after_gap, H, 1)


def test_alert_text_names_the_streak_the_total_and_the_worst_org() -> None:
    c = compare(
        "gbs",
        T0 + H,
        T0 + 2 * H,
        {"big": 5000 * U, "a": 100 * U},
        {"a": Decimal(100)},
        Decimal("0.02"),
        POLICY,
    )
    run = parity.to_run(c, T0 + 3 * H, _run(T0, True, None))
    text = parity.alert_text(c, run, POLICY, H)
    assert "2 consecutive buckets" in text
    assert "since 2026-01-01T00:00Z" in text
    assert "big: control plane 5000, legacy absent" in text
    assert "legacy 100" in text


# windows and clean-since --------------------------------------------------------------------


def test_window_must_be_aligned_and_ordered() -> None:
    assert parity.window_problems(T0, T0 + H, H) == []
    fields = [p.field for p in parity.window_problems(T0 + 1, T0 + H + 5, H)]
    assert fields == ["from", "to"]
    assert "nearest below: 1767225600" in parity.window_problems(T0 + 1, T0 + H, H)[0].message
    assert [p.field for p in parity.window_problems(T0 + H, T0, H)] == ["to"]
    assert [p.field for p in parity.window_problems(None, T0, H)] == ["from"]


def test_clean_since_walks_back_over_contiguous_clean_buckets() -> None:
    tail = [T0 + 3 * H, T0 + 2 * H, T0 + H]
    since = parity.clean_since(tail, T0 + 3 * H, H)
    assert (since.since, since.until, since.buckets, since.seconds) == (
        T0 + H,
        T0 + 4 * H,
        3,
        3 * H,
    )


def test_clean_since_is_none_when_the_newest_check_is_unclean() -> None:
    since = parity.clean_since([T0 + H], T0 + 2 * H, H)
    assert since.since is None and since.until == T0 + 3 * H and since.seconds == 0
    assert parity.clean_since([], None, H).since is None


def test_clean_since_stops_at_a_gap() -> None:
    since = parity.clean_since([T0 + 5 * H, T0 + 4 * H, T0 + 2 * H], T0 + 5 * H, H)
    assert since.since == T0 + 4 * H and since.buckets == 2


# signatures ----------------------------------------------------------------------------------

SECRET = "s3cret"
PATH = "/internal/usage-parity"
QUERY = f"from={T0}&to={T0 + H}"


def _verify(
    timestamp: str | None, signature: str | None, query: str = QUERY, now: int = T0
) -> None:
    parity.verify_signature(SECRET, timestamp, signature, PATH, query, now)


def test_valid_signature_passes_within_the_window() -> None:
    sig = parity.sign(SECRET, T0, PATH, QUERY)
    _verify(str(T0), sig)
    _verify(str(T0), "sha256=" + sig.upper())
    _verify(str(T0), sig, now=T0 + 300)
    _verify(str(T0), sig, now=T0 - 300)


def test_signature_signs_the_documented_message() -> None:
    import hashlib
    import hmac

    message = f"{T0}.{PATH}?{QUERY}".encode()
    assert (
        parity.sign(SECRET, T0, PATH, QUERY)
        == hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()
    )


@pytest.mark.parametrize(
    ("timestamp", "signature", "query", "now", "reason"),
    [
        (str(T0), "SIGN", QUERY, T0 + 301, "outside the ±300 s window"),
        (str(T0), "SIGN", QUERY, T0 - 301, "outside the ±300 s window"),
        (str(T0), "SIGN", f"from={T0}&to={T0 + 2 * H}", T0, "does not match"),
        (str(T0), "SIGN", QUERY + "&x=1", T0, "does not match"),
        (str(T0 + 1), "SIGN", QUERY, T0, "does not match"),
        (str(T0), parity.sign("wrong", T0, PATH, QUERY), QUERY, T0, "does not match"),
        (str(T0), "", QUERY, T0, "need both"),
        (None, "SIGN", QUERY, T0, "need both"),
        ("12.5", "SIGN", QUERY, T0, "unix seconds"),
        (str(T0), "zzz\u00e9", QUERY, T0, "does not match"),
    ],
)
def test_bad_signatures_are_refused(
    timestamp: str | None, signature: str, query: str, now: int, reason: str
) -> None:
    if signature == "SIGN":
        signature = parity.sign(SECRET, T0, PATH, QUERY)
    with pytest.raises(Unauthorized, match=reason) as err:
        _verify(timestamp, signature, query, now)
    assert parity.sign(SECRET, T0, PATH, QUERY) not in str(err.value)

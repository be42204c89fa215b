"""Parity: the control plane's usage against the legacy biller's, and when a drift matters.

Pure functions over exact integers (micro-units, see :mod:`controlplane.units`); the I/O around
them is in :mod:`controlplane.parity_checker` and :class:`controlplane.core.ControlPlane`.

Per org, with an org absent on one side counted as 0 on that side:

- ``drift = controlplane - legacy``; ``absolute drift = |drift|``;
- ``relative drift = |drift| / |legacy|``: 0 when both are 0, undefined (null, ranked as
  infinite) when only the legacy side is 0. Shown rounded *up* to six decimals, so it never
  reads smaller than it is; every comparison is made on the exact values;
- **within tolerance**: on both sides, and ``|drift| <= tolerance * |legacy|``;
- **mismatch**: not within tolerance, which includes every org present on one side only.

Alert policy (:class:`Policy`): an org's drift is **material** when its relative drift exceeds
``alert.relative`` (undefined counts as infinite) and its absolute drift is at least
``alert.min_units``. A bucket is **alarming** when at least ``alert.min_orgs`` orgs drift
materially, or the total does. The checker alerts when ``alert.consecutive_buckets`` buckets in
a row are alarming.

Requests may be signed instead of carrying a bearer token: ``X-Timestamp`` (unix seconds) and
``X-Signature``, the hex HMAC-SHA256 of ``"{timestamp}.{path}{query}"`` where ``query`` is
``"?"`` followed by the query string exactly as sent (empty when there is none).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import msgspec

from controlplane.auth import Unauthorized
from controlplane.errors import Problem
from controlplane.interfaces import OrgDrift, ParityRun
from controlplane.units import MICROS, to_micros

SIGNATURE_WINDOW_SECONDS = 300

# ---------------------------------------------------------------------------------------------
# exact helpers


def fmt(micros: int) -> str:
    """`micros` as a plain decimal string without trailing zeros: `format_micros`, but by
    string slicing (it runs for every org of a 10,000-org answer)."""
    if micros < 0:
        return "-" + fmt(-micros)
    digits = str(micros)
    if len(digits) <= 6:
        digits = "0" * (7 - len(digits)) + digits
    whole, frac = digits[:-6], digits[-6:].rstrip("0")
    return f"{whole}.{frac}" if frac else whole


_MICROS = Decimal(MICROS)


def micros_of(value: Decimal) -> int:
    """`to_micros`, with a fast path for values of at most six decimals (the usual case)."""
    scaled = value * _MICROS
    whole = int(scaled)
    return whole if whole == scaled else to_micros(value)


class Ratio(msgspec.Struct, frozen=True):
    """An exact non-negative fraction, from a Decimal setting such as 0.02."""

    num: int
    den: int

    @classmethod
    def of(cls, value: Decimal) -> Ratio:
        num, den = value.as_integer_ratio()
        return cls(num, den)

    def __str__(self) -> str:
        return fmt(self.num * MICROS // self.den) if self.den else "0"


def relative_micros(absolute: int, legacy: int) -> int | None:
    """|drift| / |legacy| in millionths, rounded up; 0 for 0/0; None when undefined."""
    base = abs(legacy)
    if base == 0:
        return 0 if absolute == 0 else None
    return -((-absolute * MICROS) // base)


def within(absolute: int, legacy: int, tolerance: Ratio) -> bool:
    """absolute <= tolerance * |legacy|, exactly."""
    return absolute * tolerance.den <= tolerance.num * abs(legacy)


def exceeds(absolute: int, legacy: int, limit: Ratio) -> bool:
    """absolute / |legacy| > limit, exactly (an undefined ratio exceeds every limit)."""
    if legacy == 0:
        return absolute > 0
    return absolute * limit.den > limit.num * abs(legacy)


# ---------------------------------------------------------------------------------------------
# comparison


class Policy(msgspec.Struct, frozen=True):
    """The alert policy (see the module docstring), in exact terms."""

    relative: Ratio
    min_units_micros: int
    min_orgs: int
    consecutive: int

    @classmethod
    def of(cls, relative: Decimal, min_units: Decimal, min_orgs: int, consecutive: int) -> Policy:
        return cls(Ratio.of(relative), to_micros(min_units), min_orgs, consecutive)

    @property
    def limit(self) -> tuple[int, int]:
        """The relative limit as (absolute, legacy) arguments of `relative_micros`."""
        return self.relative.num, self.relative.den

    def material(self, absolute: int, legacy: int) -> bool:
        return absolute >= self.min_units_micros and exceeds(absolute, legacy, self.relative)


class OrgParity(msgspec.Struct, frozen=True):
    org_id: str
    controlplane: int | None  # micro-units; None: absent on this side
    legacy: int | None
    drift: int  # controlplane - legacy, absent sides as 0
    relative: int | None  # millionths, rounded up; None: undefined
    within_tolerance: bool
    material: bool

    @property
    def absolute(self) -> int:
        return abs(self.drift)

    @property
    def side(self) -> str:
        if self.legacy is None:
            return "controlplane"
        if self.controlplane is None:
            return "legacy"
        return "both"


class Summary(msgspec.Struct, frozen=True):
    status: str  # "clean" | "mismatch" | "no_legacy"
    orgs: int
    mismatches: int
    only_controlplane: int
    only_legacy: int
    material_orgs: int
    alarming: bool
    worst: OrgParity | None  # largest relative drift (undefined first), then absolute
    controlplane_total: int
    legacy_total: int | None
    total_drift: int | None
    total_relative: int | None
    total_within_tolerance: bool | None
    total_material: bool


class Comparison(msgspec.Struct, frozen=True):
    meter: str
    start: int
    end: int
    tolerance: Ratio
    orgs: list[OrgParity]  # by org id
    summary: Summary

    @property
    def mismatches(self) -> list[OrgParity]:
        return [o for o in self.orgs if not o.within_tolerance]


def _rank(o: OrgParity) -> tuple[int, int, int]:
    return (1 if o.relative is None else 0, o.relative or 0, o.absolute)


def compare(
    meter: str,
    start: int,
    end: int,
    controlplane: Mapping[str, int],
    legacy: Mapping[str, Decimal] | None,
    tolerance: Decimal,
    policy: Policy,
) -> Comparison:
    """Compare per-org usage (control plane in micro-units, legacy as exact decimals).

    With `legacy` None (no legacy source) only the control plane's side is reported: every
    org is "within tolerance" vacuously and the status is ``no_legacy``."""
    tol = Ratio.of(tolerance)
    if legacy is None:
        orgs = [
            OrgParity(org, value, None, 0, None, True, False)
            for org, value in sorted(controlplane.items())
        ]
        total = sum(controlplane.values())
        summary = Summary(
            status="no_legacy",
            orgs=len(orgs),
            mismatches=0,
            only_controlplane=0,
            only_legacy=0,
            material_orgs=0,
            alarming=False,
            worst=None,
            controlplane_total=total,
            legacy_total=None,
            total_drift=None,
            total_relative=None,
            total_within_tolerance=None,
            total_material=False,
        )
        return Comparison(meter, start, end, tol, orgs, summary)

    legacy_micros = {org: micros_of(value) for org, value in legacy.items()}
    rows: list[OrgParity] = []
    mismatches = only_cp = only_legacy = material = 0
    worst: OrgParity | None = None
    tol_num, tol_den = tol.num, tol.den
    floor, limit = policy.min_units_micros, policy.relative
    for org in sorted(controlplane.keys() | legacy_micros.keys()):
        cp = controlplane.get(org)
        lg = legacy_micros.get(org)
        cp_value = cp or 0
        lg_value = lg or 0
        drift = cp_value - lg_value
        absolute = drift if drift >= 0 else -drift
        base = lg_value if lg_value >= 0 else -lg_value
        ok = cp is not None and lg is not None and absolute * tol_den <= tol_num * base
        is_material = absolute >= floor and exceeds(absolute, lg_value, limit)
        relative = -((-absolute * MICROS) // base) if base else (0 if not absolute else None)
        row = OrgParity(org, cp, lg, drift, relative, ok, is_material)
        rows.append(row)
        if not ok:
            mismatches += 1
        if lg is None:
            only_cp += 1
        elif cp is None:
            only_legacy += 1
        if is_material:
            material += 1
        if absolute and (worst is None or _rank(row) > _rank(worst)):
            worst = row
    cp_total = sum(controlplane.values())
    lg_total = sum(legacy_micros.values())
    total_abs = abs(cp_total - lg_total)
    total_material = policy.material(total_abs, lg_total)
    summary = Summary(
        status="clean" if mismatches == 0 else "mismatch",
        orgs=len(rows),
        mismatches=mismatches,
        only_controlplane=only_cp,
        only_legacy=only_legacy,
        material_orgs=material,
        alarming=material >= policy.min_orgs or total_material,
        worst=worst,
        controlplane_total=cp_total,
        legacy_total=lg_total,
        total_drift=cp_total - lg_total,
        total_relative=relative_micros(total_abs, lg_total),
        total_within_tolerance=within(total_abs, lg_total, tol),
        total_material=total_material,
    )
    return Comparison(meter, start, end, tol, rows, summary)


def window_problems(start: int | None, end: int | None, bucket_seconds: int) -> list[Problem]:
    """Why [start, end) is not a valid parity window (empty when it is)."""
    problems: list[Problem] = []
    for name, value in (("from", start), ("to", end)):
        if value is None:
            problems.append(Problem(field=name, message="required (unix seconds)"))
        elif value % bucket_seconds:
            problems.append(
                Problem(
                    field=name,
                    message=f"{value} is not aligned to the {bucket_seconds} s buckets "
                    f"(nearest below: {value - value % bucket_seconds})",
                )
            )
    if not problems and start is not None and end is not None and end <= start:
        problems.append(Problem(field="to", message="must be after `from`"))
    return problems


# ---------------------------------------------------------------------------------------------
# JSON


def _rel(value: int | None) -> str | None:
    return None if value is None else fmt(value)


def org_api(o: OrgParity, has_legacy: bool) -> dict[str, Any]:
    if not has_legacy:
        return {
            "org_id": o.org_id,
            "controlplane": fmt(o.controlplane or 0),
            "legacy": None,
            "side": "controlplane",
            "drift": None,
            "absolute_drift": None,
            "relative_drift": None,
            "within_tolerance": None,
        }
    cp, lg, drift, relative = o.controlplane, o.legacy, o.drift, o.relative
    cp_text = None if cp is None else fmt(cp)
    lg_text = None if lg is None else (cp_text if lg == cp else fmt(lg))
    if drift == 0:
        drift_text = absolute_text = "0"
    else:
        drift_text = fmt(drift)
        absolute_text = drift_text[1:] if drift < 0 else drift_text
    return {
        "org_id": o.org_id,
        "controlplane": cp_text,
        "legacy": lg_text,
        "side": o.side,
        "drift": drift_text,
        "absolute_drift": absolute_text,
        "relative_drift": "0" if relative == 0 else (None if relative is None else fmt(relative)),
        "within_tolerance": o.within_tolerance,
    }


def comparison_api(c: Comparison, mismatches_only: bool = False) -> dict[str, Any]:
    s = c.summary
    has_legacy = s.status != "no_legacy"
    rows = c.mismatches if mismatches_only else c.orgs
    return {
        "meter": c.meter,
        "from": c.start,
        "to": c.end,
        "tolerance": str(c.tolerance),
        "summary": {
            "status": s.status,
            "orgs": s.orgs,
            "mismatches": s.mismatches,
            "only_controlplane": s.only_controlplane,
            "only_legacy": s.only_legacy,
            "worst": None
            if s.worst is None
            else {
                "org_id": s.worst.org_id,
                "drift": fmt(s.worst.drift),
                "relative_drift": _rel(s.worst.relative),
            },
            "totals": {
                "controlplane": fmt(s.controlplane_total),
                "legacy": None if s.legacy_total is None else fmt(s.legacy_total),
                "drift": None if s.total_drift is None else fmt(s.total_drift),
                "relative_drift": _rel(s.total_relative),
                "within_tolerance": s.total_within_tolerance,
            },
            "material_orgs": s.material_orgs,
            "alarming": s.alarming,
        },
        "orgs": [org_api(o, has_legacy) for o in rows],
    }


def run_api(run: ParityRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "meter": run.meter,
        "bucket_start": run.bucket_start,
        "bucket_end": run.bucket_end,
        "checked_at": run.checked_at,
        "status": "clean" if run.clean else "mismatch",
        "orgs": run.orgs,
        "mismatches": run.mismatches,
        "material_orgs": run.material,
        "alarming": run.alarming,
        "alarm_since": run.alarm_since,
        "totals": {
            "controlplane": fmt(run.controlplane_micros),
            "legacy": fmt(run.legacy_micros),
            "drift": fmt(run.controlplane_micros - run.legacy_micros),
        },
        "worst": None
        if run.worst_org is None
        else {
            "org_id": run.worst_org,
            "absolute_drift": fmt(run.worst_drift_micros),
            "relative_drift": run.worst_relative,
        },
    }


def drift_api(d: OrgDrift) -> dict[str, Any]:
    cp = d.controlplane_micros
    lg = d.legacy_micros
    drift = (cp or 0) - (lg or 0)
    return {
        "org_id": d.org_id,
        "controlplane": None if cp is None else fmt(cp),
        "legacy": None if lg is None else fmt(lg),
        "drift": fmt(drift),
        "relative_drift": _rel(relative_micros(abs(drift), lg or 0)),
    }


# ---------------------------------------------------------------------------------------------
# the checker's history


def to_run(c: Comparison, checked_at: int, previous: ParityRun | None) -> ParityRun:
    """The stored record of a checked bucket; `previous` is the run of the bucket before."""
    s = c.summary
    alarm_since: int | None = None
    if s.alarming:
        alarm_since = c.start
        if previous is not None and previous.bucket_end == c.start and previous.alarming:
            alarm_since = previous.alarm_since or previous.bucket_start
    return ParityRun(
        meter=c.meter,
        bucket_start=c.start,
        bucket_end=c.end,
        checked_at=checked_at,
        orgs=s.orgs,
        mismatches=s.mismatches,
        material=s.material_orgs,
        controlplane_micros=s.controlplane_total,
        legacy_micros=s.legacy_total or 0,
        worst_org=s.worst.org_id if s.worst else None,
        worst_drift_micros=s.worst.absolute if s.worst else 0,
        worst_relative=_rel(s.worst.relative) if s.worst else None,
        clean=s.mismatches == 0,
        alarming=s.alarming,
        alarm_since=alarm_since,
    )


def drifts(c: Comparison) -> list[OrgDrift]:
    return [OrgDrift(o.org_id, o.controlplane, o.legacy) for o in c.mismatches]


def should_alert(run: ParityRun, bucket_seconds: int, consecutive: int) -> bool:
    """True when `run` ends a streak of at least `consecutive` alarming buckets."""
    if not run.alarming or run.alarm_since is None:
        return False
    return (run.bucket_start - run.alarm_since) // bucket_seconds + 1 >= consecutive


def dedup_key(run: ParityRun) -> str:
    """Names the incident (the meter and the first bucket of its alarming streak), so the
    receiver can fold reminders of the same incident together."""
    return f"parity:{run.meter}:{run.alarm_since}"


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%MZ")


def _pct(relative: int | None) -> str:
    if relative is None:
        return "n/a"
    return f"{fmt(relative * 100)} %"


def alert_text(c: Comparison, run: ParityRun, policy: Policy, bucket_seconds: int) -> str:
    s = c.summary
    streak = (run.bucket_start - (run.alarm_since or run.bucket_start)) // bucket_seconds + 1
    lines = [
        f"Parity drift on `{c.meter}` for {streak} consecutive buckets "
        f"(since {_iso(run.alarm_since or run.bucket_start)}; latest {_iso(c.start)} to "
        f"{_iso(c.end)}).",
        f"{s.material_orgs} org(s) drift by more than {_pct(relative_micros(*policy.limit))} "
        f"and at least {fmt(policy.min_units_micros)} units (alert at {policy.min_orgs}); "
        f"{s.mismatches} of {s.orgs} orgs outside the {c.tolerance!s} tolerance.",
        f"Total: control plane {fmt(s.controlplane_total)}, legacy "
        f"{fmt(s.legacy_total or 0)} (drift {fmt(s.total_drift or 0)}, "
        f"{_pct(s.total_relative)}).",
    ]
    if s.worst is not None:
        w = s.worst
        lines.append(
            f"Worst: {w.org_id}: control plane "
            f"{'absent' if w.controlplane is None else fmt(w.controlplane)}, legacy "
            f"{'absent' if w.legacy is None else fmt(w.legacy)} ({_pct(w.relative)})."
        )
    return "\n".join(lines)


class CleanSince(msgspec.Struct, frozen=True):
    """How long the checker has seen parity hold without a break."""

    since: int | None  # start of the first bucket of the unbroken clean streak
    until: int | None  # end of the newest checked bucket
    buckets: int  # buckets in the streak

    @property
    def seconds(self) -> int:
        return 0 if self.since is None or self.until is None else self.until - self.since


def clean_since(tail: Sequence[int], newest: int | None, bucket_seconds: int) -> CleanSince:
    """The latest unbroken streak of clean checks that reaches the newest checked bucket.

    `tail`: bucket starts of the clean runs after the newest unclean one, newest first;
    `newest`: the newest checked bucket's start. A gap (an unchecked bucket) ends the streak."""
    if newest is None:
        return CleanSince(None, None, 0)
    until = newest + bucket_seconds
    if not tail or tail[0] != newest:
        return CleanSince(None, until, 0)
    since = newest
    count = 0
    expected = newest
    for start in tail:
        if start != expected:
            break
        since = start
        count += 1
        expected -= bucket_seconds
    return CleanSince(since, until, count)


# ---------------------------------------------------------------------------------------------
# signed requests


def sign(secret: str, timestamp: int | str, path: str, query: str) -> str:
    """Hex HMAC-SHA256 of ``"{timestamp}.{path}{query}"``; `query` without its "?"."""
    message = f"{timestamp}.{path}{'?' + query if query else ''}"
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def verify_signature(
    secret: str,
    timestamp: str | None,
    signature: str | None,
    path: str,
    query: str,
    now: float,
    window: int = SIGNATURE_WINDOW_SECONDS,
) -> None:
    """Raise Unauthorized unless `signature` signs this request within ±`window` seconds.

    The reason given never reveals the expected signature."""
    if not timestamp or not signature:
        raise Unauthorized("signed requests need both X-Timestamp and X-Signature")
    # at most 12 digits: any longer is no time this window contains (and int() of thousands
    # of digits, or a float of it, fails)
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise Unauthorized("X-Timestamp: expected unix seconds")
    if abs(int(now) - int(timestamp)) > window:
        raise Unauthorized(f"X-Timestamp: outside the ±{window} s window; sign again")
    presented = signature.strip().lower().removeprefix("sha256=")
    expected = sign(secret, timestamp, path, query)
    if not hmac.compare_digest(expected.encode(), presented.encode("utf-8", "replace")):
        raise Unauthorized("X-Signature does not match this request")

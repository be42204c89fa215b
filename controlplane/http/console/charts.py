"""Server-rendered SVG charts for the console.

Hand-built rather than a charting library (pygal and the like): the console draws one line
chart of a few hundred points, which takes about a hundred lines here, with no dependency to
keep current, exact control over the markup (a ``<title>`` and a text label per point, so the
chart reads without JavaScript and with a screen reader) and over what it tells without colour:
clean runs are drawn as circles, mismatching runs as squares, alarming runs as triangles, and
each shape is named in the legend beside it.

Values are computed with Decimal and rounded only when turned into coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from xml.sax.saxutils import escape, quoteattr

from controlplane.interfaces import ParityRun
from controlplane.times import iso

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 44


@dataclass(frozen=True)
class Point:
    run_id: int
    bucket_start: int
    drift_percent: Decimal  # abs(control plane - legacy) / legacy * 100 over all orgs
    status: str  # clean, mismatch or alarming

    @property
    def label(self) -> str:
        return (
            f"run {self.run_id}, bucket {iso(self.bucket_start)}: drift "
            f"{self.drift_percent.quantize(Decimal('0.01'))} %, {self.status}"
        )


def drift_percent(run: ParityRun) -> Decimal:
    """The run's total drift as a percentage of the legacy total (100 when legacy is 0 and
    the control plane is not; 0 when both are 0)."""
    diff = abs(run.controlplane_micros - run.legacy_micros)
    if run.legacy_micros == 0:
        return Decimal(100) if diff else Decimal(0)
    return Decimal(diff) * 100 / abs(Decimal(run.legacy_micros))


def points(runs: list[ParityRun]) -> list[Point]:
    """One point per run, oldest bucket first."""
    return [
        Point(
            run_id=r.id,
            bucket_start=r.bucket_start,
            drift_percent=drift_percent(r),
            status="alarming" if r.alarming else "clean" if r.clean else "mismatch",
        )
        for r in sorted(runs, key=lambda r: (r.bucket_start, r.id))
    ]


def _marker(status: str, x: float, y: float) -> str:
    if status == "clean":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" class="pt clean"/>'
    if status == "mismatch":
        return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" class="pt mismatch"/>'
    return (
        f'<polygon points="{x:.1f},{y - 5:.1f} {x + 5:.1f},{y + 4:.1f} {x - 5:.1f},{y + 4:.1f}" '
        'class="pt alarming"/>'
    )


def drift_chart(runs: list[ParityRun], tolerance_percent: Decimal) -> str:
    """An SVG line chart of drift (%) per parity run, with the tolerance as a dashed line.
    Every point is a ``<g class="point">`` with a ``<title>`` naming its run, bucket, drift
    and status."""
    pts = points(runs)
    title = "Parity drift (%) per checked bucket"
    if not pts:
        return (
            f'<svg role="img" aria-label="{title}: no runs yet" width="{WIDTH}" height="60" '
            f'viewBox="0 0 {WIDTH} 60" xmlns="http://www.w3.org/2000/svg">'
            f'<text x="10" y="35">No parity runs stored yet.</text></svg>'
        )
    top = max([p.drift_percent for p in pts] + [tolerance_percent * 2, Decimal(1)])
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM

    def x_of(i: int) -> float:
        return LEFT + (plot_w * (i + 0.5) / len(pts))

    def y_of(value: Decimal) -> float:
        return TOP + plot_h - float(value / top) * plot_h

    out = [
        f'<svg role="img" aria-labelledby="chart-title" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg" class="chart">',
        f'<title id="chart-title">{title}: {len(pts)} runs</title>',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" '
        'class="axis"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" class="axis"/>',
    ]
    for fraction in (Decimal(0), Decimal("0.5"), Decimal(1)):
        value = top * fraction
        y = y_of(value)
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
            f"{value.quantize(Decimal('0.1'))} %</text>"
        )
    ty = y_of(tolerance_percent)
    out.append(
        f'<line x1="{LEFT}" y1="{ty:.1f}" x2="{WIDTH - RIGHT}" y2="{ty:.1f}" class="tolerance"/>'
        f'<text x="{WIDTH - RIGHT}" y="{ty - 4:.1f}" text-anchor="end" class="tick">'
        f"tolerance {tolerance_percent.normalize()} %</text>"
    )
    line = " ".join(f"{x_of(i):.1f},{y_of(p.drift_percent):.1f}" for i, p in enumerate(pts))
    out.append(f'<polyline points="{line}" class="drift"/>')
    for i, p in enumerate(pts):
        out.append(
            f'<g class="point" data-run={quoteattr(str(p.run_id))} '
            f"data-status={quoteattr(p.status)}><title>{escape(p.label)}</title>"
            f"{_marker(p.status, x_of(i), y_of(p.drift_percent))}</g>"
        )
    for i, anchor in ((0, "start"), (len(pts) - 1, "end")):
        if i == 0 and anchor == "end":
            continue  # one run: one label
        out.append(
            f'<text x="{x_of(i):.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="{anchor}" '
            f'class="tick">{escape(iso(pts[i].bucket_start)[:16])}</text>'
        )
    out.append("</svg>")
    return "".join(out)

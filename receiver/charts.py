"""Inline SVG charts drawn on the server (pure): no script, no external asset, every label
escaped. Colours come from CSS classes, because the CSP allows no inline style."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

WIDTH, HEIGHT, PAD = 640, 160, 28

SERIES = (("passed", "passed"), ("not_passed", "not passed"), ("failed", "failed"))


def _svg(body: list[str], label: str, height: int = HEIGHT) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
        + "".join(body)
        + "</svg>"
    )


def _empty(label: str, text: str = "no data yet") -> str:
    return _svg(
        [
            f'<text class="muted" x="{WIDTH / 2}" y="{HEIGHT / 2}" '
            f'text-anchor="middle">{escape(text)}</text>'
        ],
        label,
    )


def daily_verdicts(days: Sequence[Mapping[str, Any]], label: str = "verdicts per day") -> str:
    """Stacked bars per day: passed, not passed, failed (oldest on the left)."""
    if not days:
        return _empty(label)
    top = max(int(day.get("total") or 0) for day in days) or 1
    step = (WIDTH - 2 * PAD) / len(days)
    width = max(step * 0.8, 1.0)
    plot = HEIGHT - 2 * PAD
    body = [
        f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" '
        f'y2="{HEIGHT - PAD}"/>',
        f'<text class="tick" x="{PAD - 4}" y="{PAD + 4}" text-anchor="end">{top}</text>',
    ]
    for index, day in enumerate(days):
        x = PAD + index * step + (step - width) / 2
        y = float(HEIGHT - PAD)
        parts = []
        for key, name in SERIES:
            count = int(day.get(key) or 0)
            if not count:
                continue
            height = plot * count / top
            y -= height
            parts.append(
                f'<rect class="bar-{key}" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" '
                f'height="{height:.1f}"><title>{escape(str(day.get("day")))}: {count} {name}'
                "</title></rect>"
            )
        body.extend(parts)
    body.append(_day_ticks(days))
    return _svg(body, label)


def daily_rates(days: Sequence[Mapping[str, Any]], label: str = "pass rate and mean score") -> str:
    """Two lines from 0 to 1 per day: pass rate and mean score."""
    if not days:
        return _empty(label)
    step = (WIDTH - 2 * PAD) / max(len(days) - 1, 1)
    plot = HEIGHT - 2 * PAD
    body = [
        f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" '
        f'y2="{HEIGHT - PAD}"/>',
        f'<text class="tick" x="{PAD - 4}" y="{PAD + 4}" text-anchor="end">1</text>',
        f'<text class="tick" x="{PAD - 4}" y="{HEIGHT - PAD}" text-anchor="end">0</text>',
    ]
    for key, name in (("pass_rate", "pass rate"), ("mean_score", "mean score")):
        points = []
        for index, day in enumerate(days):
            value = day.get(key)
            if value is None:
                continue
            x = PAD + index * step if len(days) > 1 else WIDTH / 2  # one day: centred
            y = HEIGHT - PAD - plot * float(value)
            points.append((x, y, f"{escape(str(day.get('day')))}: {name} {float(value):.2f}"))
        if points:
            line = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points)
            body.append(f'<polyline class="line-{key}" points="{line}"/>')
            body.extend(
                f'<circle class="dot-{key}" cx="{x:.1f}" cy="{y:.1f}" r="2.5">'
                f"<title>{title}</title></circle>"
                for x, y, title in points
            )
    body.append(_day_ticks(days))
    return _svg(body, label)


def _day_ticks(days: Sequence[Mapping[str, Any]]) -> str:
    first, last = escape(str(days[0].get("day"))), escape(str(days[-1].get("day")))
    y = HEIGHT - PAD + 16
    if len(days) == 1:  # one label under the middle, not the same date at both ends
        return f'<text class="tick" x="{WIDTH / 2}" y="{y}" text-anchor="middle">{first}</text>'
    return (
        f'<text class="tick" x="{PAD}" y="{y}">{first}</text>'
        f'<text class="tick" x="{WIDTH - PAD}" y="{y}" text-anchor="end">{last}</text>'
    )


def ranked(rows: Sequence[tuple[str, int]], label: str, empty: str = "no data yet") -> str:
    """Horizontal bars, largest first (failure codes, issue categories); `empty` says why
    there are none."""
    if not rows:
        return _empty(label, empty)
    top = max(count for _, count in rows) or 1
    line = 22
    height = PAD + line * len(rows)
    label_width = 220
    span = WIDTH - label_width - PAD - 40
    body = []
    for index, (name, count) in enumerate(rows):
        y = PAD / 2 + index * line
        width = max(span * count / top, 1.0)
        text = escape(name if len(name) <= 34 else name[:33] + "…")
        body.append(
            f'<text class="label" x="{label_width - 6}" y="{y + 14}" text-anchor="end">{text}'
            f"<title>{escape(name)}</title></text>"
            f'<rect class="bar-rank" x="{label_width}" y="{y + 3}" width="{width:.1f}" '
            f'height="{line - 8}"/>'
            f'<text class="tick" x="{label_width + width + 6:.1f}" y="{y + 14}">{count}</text>'
        )
    return _svg(body, label, height)

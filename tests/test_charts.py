from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from receiver.charts import daily_rates, daily_verdicts, ranked

DAYS = [
    {
        "day": "2026-11-20",
        "total": 5,
        "passed": 3,
        "not_passed": 1,
        "failed": 1,
        "pass_rate": 0.75,
        "mean_score": 0.7,
    },
    {
        "day": "2026-11-21",
        "total": 0,
        "passed": 0,
        "not_passed": 0,
        "failed": 0,
        "pass_rate": None,
        "mean_score": None,
    },
    {
        "day": "2026-11-22",
        "total": 2,
        "passed": 0,
        "not_passed": 2,
        "failed": 0,
        "pass_rate": 0.0,
        "mean_score": 0.31,
    },
]
HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(1)"> & "quotes"'


@pytest.mark.parametrize(
    "svg",
    [
        daily_verdicts(DAYS),
        daily_rates(DAYS),
        ranked([(HOSTILE, 3), ("anatomy/hands", 9)], HOSTILE),
        daily_verdicts([]),
        ranked([], "nothing"),
        daily_verdicts([{**DAYS[0], "day": HOSTILE}]),
    ],
    ids=["verdicts", "rates", "ranked-hostile", "empty-verdicts", "empty-ranked", "hostile-day"],
)
def test_charts_are_well_formed_svg_with_every_label_escaped(svg: str) -> None:
    root = ET.fromstring(svg)  # noqa: S314 (our own output)
    assert root.tag.endswith("svg")
    assert "<script" not in svg
    assert "onerror=" not in svg.replace("onerror=&quot;", "")
    assert not any(el.tag.endswith("script") for el in root.iter())
    assert not any("style" in el.attrib for el in root.iter())  # the CSP allows no inline style


def test_bars_stack_per_day_and_carry_tooltips() -> None:
    root = ET.fromstring(daily_verdicts(DAYS))  # noqa: S314
    rects = [el for el in root.iter() if el.tag.endswith("rect")]
    assert [r.get("class") for r in rects] == [
        "bar-passed",
        "bar-not_passed",
        "bar-failed",
        "bar-not_passed",
    ]
    titles = [el.text for el in root.iter() if el.tag.endswith("title")]
    assert "2026-11-20: 3 passed" in titles


def test_rates_skip_days_without_a_value() -> None:
    root = ET.fromstring(daily_rates(DAYS))  # noqa: S314
    dots = [el for el in root.iter() if el.tag.endswith("circle")]
    assert len(dots) == 4  # two days with values, two series

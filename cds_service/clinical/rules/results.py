"""What every kind of result rule shares: reading a result's value and flag, and saying it in words."""
from __future__ import annotations

from operator import attrgetter

from ...fhir.record import Measurement, num

VALUE = attrgetter("value")


def newest_with_value(results: list[Measurement]) -> Measurement | None:
    """The first result (newest first) with a usable value; later ones are never read."""
    return next((m for m in results if m.value is not None), None)


def flag(m: Measurement, rule: dict) -> str | None:
    if m.interpretation & {"H", "HH", "POS", "A", "AA", "HU"}:
        return "high"
    if m.interpretation & {"L", "LL", "LU"}:
        return "low"
    return None


def measure_text(rule: dict, m: Measurement) -> str:
    if m.value is None:
        return f"{rule['label']}: result flagged {','.join(sorted(m.interpretation))} on {m.when.isoformat()}"
    if m.computed_from:
        return f"{rule['label'].split(' (')[0]}: eGFR {m.value:.0f} ({m.computed_from})"
    comparator = m.comparator
    raw = m.raw_value if isinstance(m.raw_value, (int, float)) else None
    if comparator and raw is not None and (not m.raw_unit or m.raw_unit == m.unit):
        shown = f"{comparator}{num(raw)} {m.unit}".strip()
    else:
        shown = f"{m.value:.3g} {m.unit}".strip()
        if m.raw_unit and m.raw_unit != m.unit and raw is not None:
            shown += f" (reported {comparator}{num(raw)} {m.raw_unit})"
    return f"{rule['label'].split(' (')[0]}: {shown} on {m.when.isoformat()}"

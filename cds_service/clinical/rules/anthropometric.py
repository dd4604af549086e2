"""`kind: bmi`: a low BMI, recorded or computed from weight and height."""
from __future__ import annotations

from datetime import date

from ...fhir.record import PatientRecord
from ..assessment import Evidence
from .results import newest_with_value


def evaluate(rule: dict, rec: PatientRecord, since: date) -> list[Evidence]:
    m = newest_with_value(rec.results(rule["loinc"], since))
    w = newest_with_value(rec.results(rule["weight_loinc"], since))
    if m is not None and (w is None or m.when >= w.when):
        return [Evidence(m.reference, f"BMI {m.value:.1f} kg/m2 on {m.when.isoformat()}")] if m.value < rule["below"] else []
    h = next((r for r in rec.results(rule["height_loinc"]) if r.value), None)
    if w is not None and h is not None:
        value = w.value / ((h.value / 100) ** 2)
        if value < rule["below"]:
            return [Evidence(w.reference, f"Weight {w.value:.1f} kg on {w.when.isoformat()}"),
                    Evidence(h.reference, f"height {h.value:.0f} cm: BMI {value:.1f} kg/m2")]
    return []

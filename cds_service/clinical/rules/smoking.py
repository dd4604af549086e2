"""`kind: smoking`: the newest smoking status says current smoker."""
from __future__ import annotations

from datetime import date

from ...fhir.record import Measurement, PatientRecord
from ..assessment import Evidence


def evaluate(rule: dict, rec: PatientRecord, since: date) -> list[Evidence]:
    results = rec.results(rule["loinc"], since)
    if not results:
        return []
    m = results[0]
    if smoking_current(m, rule):
        return [Evidence(m.reference, f"Smoking status '{m.value_text or 'current smoker'}' on {m.when.isoformat()}")]
    return []


def smoking_current(m: Measurement, rule: dict) -> bool:
    if any(c.get("code") in rule["current_codes"] for c in m.value_codes):
        return True
    text = m.value_text.lower()
    if any(w in text for w in rule["not_current_words"]):
        return False
    return any(w in text for w in rule["current_words"])

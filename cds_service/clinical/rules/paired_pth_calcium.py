"""`kind: pth_calcium`: high (albumin-corrected) calcium paired with a PTH that is high or not suppressed: the
primary hyperparathyroidism pattern."""
from __future__ import annotations

from datetime import date

from ...fhir.record import PatientRecord, num
from ..assessment import Evidence
from .results import newest_with_value


def evaluate(rule: dict, rec: PatientRecord, since: date) -> list[Evidence]:
    ca = newest_with_value(rec.results(rule["calcium_loinc"], since))
    if ca is None:
        return []
    albumin = next((m for m in rec.results(rule["albumin_loinc"], since)
                    if abs((m.when - ca.when).days) <= 1 and m.value is not None), None)
    corrected = ca.value + 0.8 * (4.0 - albumin.value) if albumin is not None else ca.value
    ca_high = corrected > rule["calcium_above"] or (ca.ref_high is not None and ca.value > ca.ref_high)
    if not ca_high:
        return []
    p = next((m for m in rec.results(rule["pth_loinc"], since)
              if abs((m.when - ca.when).days) <= rule["pair_within_days"] and m.value is not None), None)
    if p is None:
        return []
    high = p.value > rule["pth_above"] or (p.ref_high is not None and p.value > p.ref_high)
    not_suppressed = p.value >= rule.get("pth_not_suppressed_at_least", float("inf"))
    if not (high or not_suppressed):
        return []
    ca_text = f"Calcium {ca.value:.1f} mg/dL on {ca.when.isoformat()}"
    if albumin is not None:
        ca_text += f" (albumin-corrected {corrected:.1f})"
    pth_text = f"PTH {num(p.value)} pg/mL on {p.when.isoformat()}" + \
        ("" if high else " (within the normal range but not suppressed by the high calcium: inappropriately normal)")
    return [Evidence(ca.reference, ca_text), Evidence(p.reference, pth_text)]

"""`kind: smoking`: the newest smoking status says current smoker."""
from __future__ import annotations

from datetime import date

from ...fhir.record import Measurement, PatientRecord
from ...knowledge.catalog import Catalog
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


def newer_status_overrides(evidence: list[Evidence], rec: PatientRecord, catalog: Catalog) -> list[Evidence]:
    """A smoking code recorded before a newer status that says not current no longer counts (when the smoking rule
    says `newer_status_overrides_codes`)."""
    rule = next(r for r in catalog.observation_rules.values() if r["kind"] == "smoking")
    if not rule.get("newer_status_overrides_codes"):
        return evidence
    results = rec.results(rule["loinc"])
    if results and not smoking_current(results[0], rule):
        newest = results[0].when
        coded = {c.reference: c for c in rec.conditions}
        evidence = [e for e in evidence if not (e.reference in coded and (coded[e.reference].when or date.min) <= newest)]
    return evidence

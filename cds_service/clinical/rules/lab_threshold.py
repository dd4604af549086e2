"""`kind: threshold`: the newest result(s) of a lab above or below a limit (or outside the lab's own range)."""
from __future__ import annotations

from datetime import date

from ...fhir.record import Measurement, PatientRecord, num
from ..assessment import Evidence
from .results import flag, measure_text


def evaluate(rule: dict, rec: PatientRecord, since: date) -> list[Evidence]:
    if any(rec.observations.get(c) for c in rule.get("skip_if_any_loinc", ())):
        return []
    results = [m for m in rec.results(rule["loinc"], since) if m.when <= rec.as_of]
    if rule.get("before_context_medication"):
        started = [m.start for m in rec.medications_by_cause.get(f"context:{rule['before_context_medication']}", ())
                   if m.start]
        if started:
            results = [m for m in results if m.when < min(started)]
    if rule.get("max_age_at_result") is not None:
        results = [m for m in results if (rec.age_on(m.when) or 999) <= rule["max_age_at_result"]]
    n = rule.get("results", 1)
    alt = rule.get("or_below_reference_low_results")
    usable: list[Measurement] = []           # newest first; only as many as the rule reads
    for m in results:
        if m.value is not None or flag(m, rule) is not None:
            usable.append(m)
            if len(usable) >= max(n, alt or 0):
                break
    newest = usable[:n]
    if len(newest) == n and all(qualifies(m, rule, rec) for m in newest):
        return [Evidence(m.reference, measure_text(rule, m)) for m in newest]
    if alt:
        newest = usable[:alt]
        if len(newest) == alt and all(m.value is not None and m.ref_low is not None and m.value < m.ref_low for m in newest):
            return [Evidence(m.reference, measure_text(rule, m) + f" (below the lab's lower limit {num(m.ref_low)})")
                    for m in newest]
    return []


def qualifies(m: Measurement, rule: dict, rec: PatientRecord) -> bool:
    v = m.value
    if "below" in rule:
        return v is not None and v < rule["below"]
    if "at_least" in rule:
        return v is not None and v >= rule["at_least"]
    if "above" in rule:
        limit = rule["above_female"] if rec.sex == "female" and "above_female" in rule else rule["above"]
        return v is not None and v > limit
    if "outside" in rule:
        lo, hi = rule["outside"]
        return v is not None and (v < lo or v > hi)
    if rule.get("above_reference_high"):
        marked = flag(m, rule)
        if v is not None and m.ref_high is not None:
            return v > m.ref_high
        return marked == "high"
    return False

"""`kind: dexamethasone_suppression`: cortisol not suppressed after an overnight dexamethasone test."""
from __future__ import annotations

import re
from datetime import date
from functools import lru_cache

from ...fhir.record import PatientRecord, num
from ..assessment import Evidence


def evaluate(rule: dict, rec: PatientRecord, since: date) -> list[Evidence]:
    """The newest cortisol result that is an overnight dexamethasone suppression test, when cortisol
    stayed above the cut-off (Endocrine Society 2008: > 1.8 ug/dL after 1 mg)."""
    named_test = _test_names(tuple(rule["test_words"]))
    doses = [m for m in rec.medications_by_cause.get("glucocorticoids", ())
             if m.start is not None and m.mg_per_dose is not None and m.mg_per_dose <= rule["test_dose_max_mg"]
             and any(i.name == "dexamethasone" for i in m.ingredients)]
    for m in rec.results(rule["loinc"], since):
        if m.value is None or m.when > rec.as_of:
            continue
        named = named_test.search(m.code_text.lower()) is not None
        dose = next((d for d in doses if 0 <= (m.when - d.start).days <= 1), None)
        if not named and dose is None:
            continue
        if m.value <= rule["above"]:
            return []                     # the newest suppression test was normal
        after = f" after dexamethasone {num(dose.mg_per_dose)} mg on {dose.start.isoformat()}" if dose else \
            " (dexamethasone suppression test)"
        return [Evidence(m.reference, f"Cortisol {m.value:.3g} ug/dL on {m.when.isoformat()}{after}: "
                                      f"not suppressed (above {rule['above']:g})")]
    return []


@lru_cache(maxsize=64)
def _test_names(words: tuple[str, ...]) -> re.Pattern:
    """The names that make a cortisol result a dexamethasone suppression test, compiled once per rule."""
    return re.compile("|".join(rf"(?<![a-z]){re.escape(w.lower())}(?![a-z])" for w in words))

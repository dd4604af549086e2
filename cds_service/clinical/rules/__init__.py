"""The kinds of rule a cause in cards/ can name, one module each: its codes (`condition_match`), its
`medication_rule` (`medication_exposure`, by the rule's `rule:`), and the result rules `cards/observations.yaml`
names by `kind:`, registered here under that name. A result rule takes the rule's data, the record and the first
day it reads, and returns the evidence (empty: the rule does not hold). A new kind is a module with an `evaluate`
and a line in RESULT_RULES (docs/architecture.md says what the catalog needs beside it)."""
from __future__ import annotations

from datetime import date, timedelta
from typing import Callable

from ...fhir.record import PatientRecord
from ..assessment import Evidence
from . import anthropometric, lab_threshold, paired_pth_calcium, persistent_result, smoking, suppression_test

RESULT_RULES: dict[str, Callable[[dict, PatientRecord, date], list[Evidence]]] = {
    "threshold": lab_threshold.evaluate,
    "persistent": persistent_result.evaluate,
    "pth_calcium": paired_pth_calcium.evaluate,
    "bmi": anthropometric.evaluate,
    "smoking": smoking.evaluate,
    "dexamethasone_suppression": suppression_test.evaluate,
}


def result_evidence(rule: dict, rec: PatientRecord) -> list[Evidence]:
    """The evidence for one result rule: the patient it applies to, its look-back, then its kind."""
    pat = rule.get("patient") or {}
    if pat.get("sex") and rec.sex != pat["sex"]:
        return []
    kind = RESULT_RULES.get(rule["kind"])
    return kind(rule, rec, rec.as_of - timedelta(days=rule.get("lookback_days", 365))) if kind else []
